//! The command tree and what each command does.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rewind_proto::v1 as pb;

use crate::client::{self, ConnectOptions, explain, request_id};
use crate::output::{self, Format, json, table, time};
use crate::watch;

/// Exit code when a rollback ended failed or aborted.
pub const EXIT_ROLLBACK_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "rewindctl",
    version,
    about = "Drive rewind: fleets, releases, changes, rollbacks, audit"
)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectOptions,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table, env = "REWIND_OUTPUT")]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Subcommand)]
pub enum Command {
    /// Hosts and their agents.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Compare hosts' captured or live state, and show drift from the last snapshot.
    #[command(subcommand)]
    Host(crate::hosts::HostCommand),
    /// Services, their dependencies and health policies.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Releases (immutable versions with an artifact digest).
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Schema migrations of databases (up, down and verify scripts, checksummed).
    #[command(subcommand)]
    Migration(crate::migrations::MigrationCommand),
    /// Schema transactions: migrations applied or reverted on every shard of a database, all
    /// or nothing (check, prepare, decide, resolve, verify).
    #[command(subcommand)]
    Schema(crate::migrations::SchemaCommand),
    /// Drills: rehearse a change's reversion elsewhere before it is needed.
    #[command(subcommand)]
    Drill(crate::migrations::DrillCommand),
    /// Changes: a release deployed to hosts, with a snapshot taken first.
    #[command(subcommand)]
    Change(ChangeCommand),
    /// Rollbacks of changes.
    #[command(subcommand)]
    Rollback(RollbackCommand),
    /// Feature flags per environment and service, pushed to agents' flags files.
    #[command(subcommand)]
    Flag(crate::flags::FlagCommand),
    /// Requests for automatic rollbacks (policies, Alertmanager, webhooks) and the breaker.
    #[command(subcommand)]
    Trigger(TriggerCommand),
    /// The hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The coordinator's members.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Who may do what: the access policy, and checking one identity's access.
    #[command(subcommand)]
    Access(crate::access::AccessCommand),
    /// Rollbacks waiting for approval where the policy requires it, and break-glass rollbacks
    /// to review.
    #[command(subcommand)]
    Request(crate::requests::RequestCommand),
    /// One-time tokens hosts and people join the cluster with (admin).
    #[command(subcommand)]
    JoinToken(crate::join::JoinTokenCommand),
    /// Your own certificate: get one with a join token, renew it.
    #[command(subcommand)]
    Cert(crate::join::CertCommand),
    /// Run the whole loop on this machine: a dev coordinator, three agents, a bad release,
    /// an automatic rollback, verified.
    Demo(crate::demo::DemoArgs),
}

#[derive(Clone, Subcommand)]
pub enum ClusterCommand {
    /// Members with their role and replication lag, as the leader sees them.
    List,
    /// Hand leadership to another member (before maintenance on the leader's host).
    TransferLeader {
        member_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Add a member: start it first with `cluster.join = true`. It joins as a learner and is
    /// promoted to voter once it has caught up; repeat the command to promote a learner.
    Add {
        member_id: u64,
        /// host:port the other members, agents and rewindctl dial.
        #[arg(long)]
        address: String,
        #[arg(long, default_value = "")]
        region: String,
        /// Common name of its certificate (default coordinator-<id>).
        #[arg(long, default_value = "")]
        name: String,
        /// Seconds to wait for it to catch up before promoting it (1..=600).
        #[arg(long, default_value_t = 60)]
        catch_up_timeout: u32,
        /// Leave it a learner (it receives the log but does not vote).
        #[arg(long)]
        learner_only: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a member that does not lead (hand leadership over first). Stop its process
    /// afterwards and wipe its data directory before it ever rejoins.
    Remove {
        member_id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The cluster version the members apply the log at, and the versions each member's
    /// binary supports.
    Version,
    /// Raise the cluster version once every member runs a release that supports it (after a
    /// rolling upgrade); refused while a member is older or does not answer.
    UpgradeFinalize {
        /// The version to raise to (default: the highest the leader's release supports).
        #[arg(long, default_value_t = 0)]
        to: u32,
        /// Why (required: audited).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Clone, Subcommand)]
pub enum FleetCommand {
    /// Registered hosts, whether connected, and their latest health.
    List,
}

#[derive(Clone, Subcommand)]
pub enum ServiceCommand {
    /// Create or replace a service.
    Set {
        name: String,
        /// A service this one calls (repeat for several).
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// Roll back automatically when more than this share of probes fail...
        #[arg(long, default_value_t = 0.5)]
        max_probe_failure_ratio: f64,
        /// ...for this many seconds...
        #[arg(long, default_value_t = 10)]
        for_s: u32,
        /// ...within this many seconds of a change being deployed.
        #[arg(long, default_value_t = 600)]
        watch_s: u32,
        /// Never roll back automatically.
        #[arg(long)]
        no_auto_rollback: bool,
        /// Another trigger condition (repeatable), over the service's own metrics or probes:
        /// `error_ratio > 0.05 for 30s`, `p99_latency_ms > 2x baseline for 60s`,
        /// `probe_failure_ratio > 0.2 for 10s`.
        #[arg(long = "condition", value_name = "CONDITION", value_parser = parse_condition)]
        conditions: Vec<pb::PolicyCondition>,
        /// A synthetic check a rollback's gate runs after each wave (repeatable), as
        /// `name=N,url=http://...[,method=POST][,body=...][,expect-status=200][,body-contains=TEXT][,max-latency-ms=2000]`.
        #[arg(long = "synthetic", value_name = "CHECK", value_parser = parse_synthetic)]
        synthetics: Vec<pb::SyntheticCheck>,
        /// A step each host goes through in a rollback, in order (repeat for each); none: drain,
        /// restore, restart, verify, undrain. From the agents' catalogue: drain, restore,
        /// restart, reload, verify, undrain, pause-jobs, resume-jobs, purge-cache, scale-up,
        /// check, and `run:COMMAND ARG=VALUE...` for a command the agents' allow-list names.
        #[arg(long = "rollback-step", value_name = "STEP")]
        rollback_steps: Vec<String>,
    },
    List,
    /// Current health figures of a service over the coordinator's window.
    Health {
        name: String,
    },
}

#[derive(Clone, Subcommand)]
pub enum ReleaseCommand {
    /// Register a release; give its digest, or a directory to compute it from.
    Register {
        service: String,
        version: String,
        #[arg(
            long,
            required_unless_present = "from_dir",
            conflicts_with = "from_dir"
        )]
        digest: Option<String>,
        /// Compute the digest of this release directory.
        #[arg(long)]
        from_dir: Option<PathBuf>,
        #[arg(long, default_value = "")]
        commit: String,
        /// API (or message schema) version this release provides.
        #[arg(long, default_value_t = 0)]
        api_version: u32,
        /// PROVIDER=VERSION: the lowest API version of a provider this release needs; repeatable.
        #[arg(long = "requires", value_name = "PROVIDER=VERSION", value_parser = parse_requirement)]
        requires: Vec<(String, u32)>,
    },
    List {
        #[arg(long, default_value = "")]
        service: String,
    },
}

fn parse_synthetic(text: &str) -> Result<pb::SyntheticCheck, String> {
    let mut check = pb::SyntheticCheck::default();
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} must be key=value"))?;
        let number = |value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}: {value:?} is not a whole number"))
        };
        match key {
            "name" => check.name = value.into(),
            "url" => check.url = value.into(),
            "method" => check.method = value.into(),
            "body" => check.body = value.into(),
            "expect-status" => check.expect_status = number(value)?,
            "body-contains" => check.body_contains = value.into(),
            "max-latency-ms" => check.max_latency_ms = number(value)?,
            other => {
                return Err(format!(
                    "unknown key {other:?}: use name, url, method, body, expect-status, body-contains, max-latency-ms"
                ));
            }
        }
    }
    if check.name.is_empty() || check.url.is_empty() {
        return Err("name= and url= are required".into());
    }
    Ok(check)
}

/// `FIGURE > NUMBER[x baseline] for Ns`.
fn parse_condition(text: &str) -> Result<pb::PolicyCondition, String> {
    let usage = "write FIGURE > LIMIT for Ns, e.g. `error_ratio > 0.05 for 30s` or `p99_latency_ms > 2x baseline for 60s`";
    let (figure, rest) = text
        .split_once('>')
        .ok_or_else(|| format!("{text:?} has no '>': {usage}"))?;
    let figure = pb::HealthFigure::from_short_name(figure.trim()).ok_or_else(|| {
        format!(
            "unknown figure {:?}: use probe_failure_ratio, error_ratio or p99_latency_ms",
            figure.trim()
        )
    })?;
    let (limit, window) = rest
        .split_once(" for ")
        .ok_or_else(|| format!("{text:?} has no `for Ns` window: {usage}"))?;
    let limit = limit.trim();
    let (number, relative_to_baseline) = match limit.strip_suffix("baseline") {
        Some(multiple) => {
            let multiple = multiple.trim_end();
            let number = multiple.strip_suffix('x').ok_or_else(|| {
                format!("{limit:?}: a limit relative to the baseline is written like `2x baseline`")
            })?;
            (number.trim(), true)
        }
        None => (limit, false),
    };
    let threshold: f64 = number
        .parse()
        .ok()
        .filter(|value: &f64| value.is_finite())
        .ok_or_else(|| format!("{number:?} in {text:?} is not a number"))?;
    let window = window.trim();
    let for_s = window
        .strip_suffix('s')
        .and_then(|seconds| seconds.parse::<u32>().ok())
        .filter(|&seconds| seconds > 0)
        .ok_or_else(|| format!("{window:?} must be whole seconds like 30s"))?;
    Ok(pb::PolicyCondition {
        figure: figure.into(),
        threshold,
        relative_to_baseline,
        for_s,
    })
}

fn parse_requirement(text: &str) -> Result<(String, u32), String> {
    let (provider, version) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} must be PROVIDER=VERSION, like api=3"))?;
    let version = version
        .parse()
        .map_err(|_| format!("{version:?} in {text:?} is not a whole number"))?;
    Ok((provider.to_string(), version))
}

#[derive(Clone, Subcommand)]
pub enum ChangeCommand {
    /// Deploy a release: snapshot every host, then switch it to the release.
    Start {
        service: String,
        version: String,
        /// Limit to these hosts (repeat); default: every host of the service.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
        /// A flag of the service this change turns on (repeat); its rollback turns it back first.
        #[arg(long = "flag-on", value_name = "FLAG")]
        flags_on: Vec<String>,
        /// A registered migration it applies, as database@version (repeat, in order): expand
        /// ones on every shard before activation, contract and data ones after, all or nothing.
        #[arg(long = "migration", value_name = "DATABASE@VERSION")]
        migrations: Vec<String>,
        /// Deploy at once where the policy asks for approvals (if it allows break-glass; needs
        /// --reason): escalated, and marked until someone else reviews it.
        #[arg(long)]
        break_glass: bool,
    },
    Status {
        change_id: String,
    },
    /// Changes, newest first, a page at a time.
    List {
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// A page of a list: how many, and where it starts.
#[derive(Clone, clap::Args)]
pub struct PageArgs {
    /// At most this many (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Only those older than this id (the previous page's last, as the list says).
    #[arg(long, default_value = "")]
    before: String,
}

/// Says how to get the next page, when there is one: the same command, filters and limit.
fn next_page(command: &str, limit: u32, next_before: &str) {
    if !next_before.is_empty() {
        say!("(more: rewindctl {command} --limit {limit} --before {next_before})");
    }
}

#[derive(Clone, Subcommand)]
pub enum RollbackCommand {
    /// Show what a rollback would do, without doing it: waves, hosts, steps, gates, readiness.
    Plan {
        #[command(flatten)]
        selection: crate::plans::SelectionArgs,
        #[command(flatten)]
        options: crate::plans::PlanArgs,
    },
    /// Roll changes back to the state captured before them, as `rollback plan` shows.
    Start {
        /// One change to roll back (the same as --change).
        change_id: Option<String>,
        #[command(flatten)]
        selection: crate::plans::SelectionArgs,
        #[command(flatten)]
        options: crate::plans::PlanArgs,
        /// Run only if the plan is still the one `rollback plan` showed with this hash.
        #[arg(long, default_value = "")]
        plan_hash: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Run at once where the policy requires approvals (needs --reason): escalated, marked
        /// in the audit and every listing, and left for an approver to review.
        #[arg(long, requires = "reason")]
        break_glass: bool,
        /// Follow it until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Where a rollback is, why it stopped, the evidence and the commands that move it on.
    Explain {
        rollback_id: String,
    },
    /// Leave one host unreverted (audited); resume afterwards if the rollback is paused.
    SkipHost {
        rollback_id: String,
        host_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Circuit breaker: drain every host of a failing service instead of reverting it (audited);
    /// the rollback goes on with its other services.
    Isolate {
        rollback_id: String,
        service: String,
        #[arg(long)]
        reason: String,
    },
    Status {
        rollback_id: String,
    },
    /// Rollbacks, newest first, a page at a time (`status` shows one's steps).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Follow a rollback live until it ends; exit 0 only if it succeeded.
    Watch {
        rollback_id: String,
    },
    Pause {
        rollback_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    Resume {
        rollback_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    Abort {
        rollback_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Subcommand)]
pub enum TriggerCommand {
    /// Recent requests for an automatic rollback and what became of each.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Close the global breaker so automatic rollbacks may start again (audited).
    ResetBreaker {
        #[arg(long)]
        reason: String,
    },
}

#[derive(Clone, Subcommand)]
pub enum AuditCommand {
    List {
        /// First entry (numbered from 1).
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Recompute the hash chain; exit 0 only if it is intact.
    Verify,
}

/// How many times a command follows a redirect to the leader.
const MAX_REDIRECTS: usize = 3;

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => return crate::demo::run(args).await,
        Command::Cert(command) => return crate::join::run_cert(&cli.connect, command).await,
        _ => {}
    }
    let mut options = cli.connect.clone();
    let mut redirects = 0;
    loop {
        let mut client = client::connect(&options).await?;
        client::restart_request_ids();
        let outcome = execute(&mut client, cli.output, cli.command.clone()).await;
        match outcome {
            Err(error) if redirects < MAX_REDIRECTS => {
                match error.downcast_ref::<client::LeaderElsewhere>() {
                    Some(leader) => {
                        tracing::info!(from = %options.coordinator, to = %leader.address, "Following the leader.");
                        options.coordinator = leader.address.clone();
                        redirects += 1;
                    }
                    None => return Err(error),
                }
            }
            other => return other,
        }
    }
}

async fn execute(
    client: &mut client::Client,
    format: Format,
    command: Command,
) -> anyhow::Result<ExitCode> {
    let client = &mut *client;
    match command {
        Command::Fleet(FleetCommand::List) => fleet_list(client, format).await,
        Command::Host(command) => crate::hosts::run(client, format, command).await,
        Command::Service(command) => service(client, format, command).await,
        Command::Release(command) => release(client, format, command).await,
        Command::Migration(command) => crate::migrations::run(client, format, command).await,
        Command::Schema(command) => crate::migrations::schema(client, format, command).await,
        Command::Drill(command) => crate::migrations::drill(client, format, command).await,
        Command::Change(command) => change(client, format, command).await,
        Command::Rollback(command) => rollback(client, format, command).await,
        Command::Audit(command) => audit(client, format, command).await,
        Command::Trigger(command) => trigger(client, format, command).await,
        Command::Flag(command) => crate::flags::run(client, format, command).await,
        Command::Access(command) => crate::access::run(client, format, command).await,
        Command::Request(command) => crate::requests::run(client, format, command).await,
        Command::JoinToken(command) => crate::join::run_tokens(client, format, command).await,
        Command::Cluster(ClusterCommand::List) => cluster_list(client, format, None).await,
        Command::Cluster(ClusterCommand::TransferLeader { member_id, reason }) => {
            let request = pb::TransferLeaderRequest {
                request_id: request_id(),
                member_id,
                reason,
            };
            let members = client
                .transfer_leader(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Table {
                say!("asked member {member_id} to take over; it leads within an election timeout");
            }
            cluster_list(client, format, Some(members)).await
        }
        Command::Cluster(ClusterCommand::Add {
            member_id,
            address,
            region,
            name,
            catch_up_timeout,
            learner_only,
            reason,
        }) => {
            let request = pb::AddMemberRequest {
                member_id,
                address,
                region,
                name,
                reason,
                catch_up_timeout_s: catch_up_timeout,
                learner_only,
            };
            let members = client
                .add_member(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Table {
                let role = if learner_only { "learner" } else { "voter" };
                say!("member {member_id} added as a {role}");
            }
            cluster_list(client, format, Some(members)).await
        }
        Command::Cluster(ClusterCommand::Remove { member_id, reason }) => {
            let request = pb::RemoveMemberRequest { member_id, reason };
            let members = client
                .remove_member(request)
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Table {
                say!("member {member_id} removed; stop its process and wipe its data dir");
            }
            cluster_list(client, format, Some(members)).await
        }
        Command::Cluster(ClusterCommand::Version) => crate::upgrade::show(client, format).await,
        Command::Cluster(ClusterCommand::UpgradeFinalize { to, reason }) => {
            crate::upgrade::finalize(client, format, to, reason).await
        }
        Command::Demo(_) | Command::Cert(_) => unreachable!("handled above"),
    }
}

async fn cluster_list(
    client: &mut client::Client,
    format: Format,
    known: Option<pb::ListMembersResponse>,
) -> anyhow::Result<ExitCode> {
    let members = match known {
        Some(members) => members,
        None => client
            .list_members(pb::ListMembersRequest {})
            .await
            .map_err(explain)?
            .into_inner(),
    };
    if format == Format::Json {
        json(&members)?;
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "cluster {}  term {}  commit index {}",
        members.cluster_id,
        members.term,
        members.commit_index
    );
    let rows = members
        .members
        .iter()
        .map(|member| {
            vec![
                member.id.to_string(),
                member.address.clone(),
                member.region.clone(),
                member.role.clone(),
                member.matched_index.to_string(),
                if member.answered {
                    member.applied_index.to_string()
                } else {
                    "?".into()
                },
                member.lag.to_string(),
                if member.recently_active {
                    "yes".into()
                } else {
                    "no".into()
                },
                if member.snapshot_in_flight {
                    "sending".into()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "ADDRESS", "REGION", "ROLE", "MATCHED", "APPLIED", "LAG", "ACTIVE", "SNAPSHOT",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn fleet_list(client: &mut client::Client, format: Format) -> anyhow::Result<ExitCode> {
    let mut hosts = pb::ListHostsResponse::default();
    loop {
        let page = client
            .list_hosts(pb::ListHostsRequest {
                page_token: hosts.next_page_token.clone(),
                page_size: 0,
            })
            .await
            .map_err(explain)?
            .into_inner();
        hosts.hosts.extend(page.hosts);
        hosts.next_page_token = page.next_page_token;
        if hosts.next_page_token.is_empty() {
            break;
        }
    }
    if format == Format::Json {
        json(&hosts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = hosts
        .hosts
        .iter()
        .map(|host| {
            let labels = host.labels.clone().unwrap_or_default();
            let health = host.last_health.as_ref().map_or_else(
                || "-".to_string(),
                |report| {
                    let failing = report.probes.iter().filter(|probe| !probe.ok).count();
                    format!(
                        "{}/{} probes ok",
                        report.probes.len() - failing,
                        report.probes.len()
                    )
                },
            );
            vec![
                host.host_id.clone(),
                if host.connected {
                    "connected".into()
                } else {
                    "disconnected".into()
                },
                labels.region,
                labels.environment,
                host.services.join(","),
                health,
            ]
        })
        .collect();
    table(
        &["HOST", "AGENT", "REGION", "ENV", "SERVICES", "HEALTH"],
        rows,
    );
    for host in hosts
        .hosts
        .iter()
        .filter(|host| !host.last_offline.is_empty())
    {
        say!("{} was {}", host.host_id, host.last_offline);
    }
    Ok(ExitCode::SUCCESS)
}

async fn service(
    client: &mut client::Client,
    format: Format,
    command: ServiceCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        ServiceCommand::Set {
            name,
            depends_on,
            max_probe_failure_ratio,
            for_s,
            watch_s,
            no_auto_rollback,
            synthetics,
            conditions,
            rollback_steps,
        } => {
            let service = pb::Service {
                name,
                depends_on,
                policy: Some(pb::HealthPolicy {
                    max_probe_failure_ratio,
                    for_s,
                    watch_s,
                    auto_rollback: !no_auto_rollback,
                    conditions,
                }),
                synthetics,
                rollback_steps,
            };
            let request = pb::PutServiceRequest {
                request_id: request_id(),
                service: Some(service),
            };
            let response = client
                .put_service(request)
                .await
                .map_err(explain)?
                .into_inner();
            print_services(format, response.service.into_iter().collect())?;
        }
        ServiceCommand::List => {
            let response = client
                .list_services(pb::ListServicesRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            print_services(format, response.services)?;
        }
        ServiceCommand::Health { name } => {
            let response = client
                .get_service_health(pb::GetServiceHealthRequest { service: name })
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&response)?;
            } else {
                let current = response.current.unwrap_or_default();
                say!(
                    "probe failure ratio {:.3} over {} samples from {} hosts",
                    current.probe_failure_ratio,
                    current.samples,
                    current.hosts_reporting
                );
                if current.requests > 0.0 || current.scrape_failures > 0 {
                    say!(
                        "from its own metrics: error ratio {} over {:.0} requests, p99 latency {}, {} failed scrapes",
                        current
                            .error_ratio
                            .map_or("- (too few requests)".into(), |ratio| format!("{ratio:.3}")),
                        current.requests,
                        current
                            .p99_latency_ms
                            .map_or("-".into(), |ms| format!("{ms:.0} ms")),
                        current.scrape_failures,
                    );
                }
                for error in &response.scrape_errors {
                    say!("metrics scrape failed on {error}");
                }
                let rows = response
                    .latest_probes
                    .iter()
                    .map(|probe| {
                        vec![
                            probe.probe.clone(),
                            probe.ok.to_string(),
                            probe.latency_ms.to_string(),
                            probe.detail.clone(),
                        ]
                    })
                    .collect();
                table(&["PROBE", "OK", "LATENCY MS", "DETAIL"], rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A condition as `--condition` takes it.
fn describe_condition(condition: &pb::PolicyCondition) -> String {
    let figure = condition.figure().short_name();
    let limit = if condition.relative_to_baseline {
        format!("{}x baseline", condition.threshold)
    } else {
        condition.threshold.to_string()
    };
    format!("{figure} > {limit} for {}s", condition.for_s)
}

fn print_services(format: Format, services: Vec<pb::Service>) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(&pb::ListServicesResponse { services });
    }
    let rows = services
        .iter()
        .map(|service| {
            let policy = service.policy.clone().unwrap_or_default();
            let trigger = if policy.auto_rollback {
                let mut conditions = vec![format!(
                    "probe_failure_ratio > {} for {}s",
                    policy.max_probe_failure_ratio, policy.for_s
                )];
                conditions.extend(policy.conditions.iter().map(describe_condition));
                format!(
                    "{} (within {} s of a change)",
                    conditions.join(" or "),
                    policy.watch_s
                )
            } else {
                "manual only".into()
            };
            let steps = if service.rollback_steps.is_empty() {
                "default".to_string()
            } else {
                service.rollback_steps.join(" -> ")
            };
            vec![
                service.name.clone(),
                service.depends_on.join(","),
                trigger,
                steps,
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "DEPENDS ON",
            "AUTOMATIC ROLLBACK",
            "ROLLBACK STEPS",
        ],
        rows,
    );
    Ok(())
}

async fn release(
    client: &mut client::Client,
    format: Format,
    command: ReleaseCommand,
) -> anyhow::Result<ExitCode> {
    let releases = match command {
        ReleaseCommand::Register {
            service,
            version,
            digest,
            from_dir,
            commit,
            api_version,
            requires,
        } => {
            let artifact_digest = match (digest, from_dir) {
                (Some(digest), _) => digest,
                (None, Some(dir)) => rewind_shared::digest::tree_digest(&dir)
                    .with_context(|| format!("compute the digest of {}", dir.display()))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let release = pb::Release {
                service,
                version,
                artifact_digest,
                commit,
                registered_at_ms: 0,
                api_version,
                requires: requires.into_iter().collect(),
            };
            let request = pb::RegisterReleaseRequest {
                request_id: request_id(),
                release: Some(release),
            };
            client
                .register_release(request)
                .await
                .map_err(explain)?
                .into_inner()
                .release
                .into_iter()
                .collect()
        }
        ReleaseCommand::List { service } => {
            client
                .list_releases(pb::ListReleasesRequest { service })
                .await
                .map_err(explain)?
                .into_inner()
                .releases
        }
    };
    if format == Format::Json {
        json(&pb::ListReleasesResponse { releases })?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = releases
        .iter()
        .map(|release| {
            vec![
                release.service.clone(),
                release.version.clone(),
                release.artifact_digest.clone(),
                release.commit.clone(),
                time(release.registered_at_ms),
            ]
        })
        .collect();
    table(
        &["SERVICE", "VERSION", "DIGEST", "COMMIT", "REGISTERED"],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn change(
    client: &mut client::Client,
    format: Format,
    command: ChangeCommand,
) -> anyhow::Result<ExitCode> {
    let change = match command {
        ChangeCommand::Start {
            service,
            version,
            hosts,
            reason,
            flags_on,
            migrations,
            break_glass,
        } => {
            let request = pb::StartChangeRequest {
                request_id: request_id(),
                service,
                version,
                host_ids: hosts,
                reason,
                flags_on,
                migrations,
                break_glass,
            };
            let answer = client
                .start_change(request)
                .await
                .map_err(explain)?
                .into_inner();
            if answer.change.is_none() {
                if format == Format::Json {
                    json(&answer)?;
                } else {
                    crate::requests::print_filed(answer.request)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            answer.change
        }
        ChangeCommand::Status { change_id } => {
            client
                .get_change(pb::GetChangeRequest { change_id })
                .await
                .map_err(explain)?
                .into_inner()
                .change
        }
        ChangeCommand::List { service, page } => {
            let command = if service.is_empty() {
                "change list".to_string()
            } else {
                format!("change list --service {service}")
            };
            let changes = client
                .list_changes(pb::ListChangesRequest {
                    service,
                    limit: page.limit,
                    before: page.before,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&changes)?;
            } else {
                let rows = changes
                    .changes
                    .iter()
                    .map(|change| {
                        vec![
                            change.change_id.clone(),
                            change.service.clone(),
                            format!("{} -> {}", change.previous_version, change.version),
                            output::change_state(change).into(),
                            change.hosts.len().to_string(),
                            time(change.started_at_ms),
                            change.rollback_id.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "CHANGE", "SERVICE", "VERSIONS", "STATE", "HOSTS", "STARTED", "ROLLBACK",
                    ],
                    rows,
                );
                next_page(&command, page.limit, &changes.next_before);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let change = change.context("the coordinator answered without a change")?;
    if format == Format::Json {
        json(&change)?;
    } else {
        output::print_change(&change);
    }
    Ok(ExitCode::SUCCESS)
}

async fn rollback(
    client: &mut client::Client,
    format: Format,
    command: RollbackCommand,
) -> anyhow::Result<ExitCode> {
    let action = |rollback_id: String, reason: String| pb::RollbackActionRequest {
        request_id: request_id(),
        rollback_id,
        reason,
        host_id: String::new(),
        service: String::new(),
    };
    let rollback = match command {
        RollbackCommand::Plan { selection, options } => {
            let plan = client
                .plan_rollback(pb::PlanRollbackRequest {
                    selection: Some(selection.into_selection(None)?),
                    options: Some(options.into_options()),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .plan
                .context("no plan in the answer")?;
            if format == Format::Json {
                json(&plan)?;
            } else {
                crate::plans::print_plan(&plan);
            }
            return Ok(if plan.runnable {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_ROLLBACK_FAILED)
            });
        }
        RollbackCommand::Explain { rollback_id } => {
            let answer = client
                .explain_rollback(pb::GetRollbackRequest { rollback_id })
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&answer)?;
            } else {
                say!("{}", answer.explanation);
                if !answer.next_commands.is_empty() {
                    say!("\nTo move it on:");
                    for command in &answer.next_commands {
                        say!("  {command}");
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        RollbackCommand::SkipHost {
            rollback_id,
            host_id,
            reason,
        } => client
            .skip_host(pb::RollbackActionRequest {
                host_id,
                ..action(rollback_id, reason)
            })
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Isolate {
            rollback_id,
            service,
            reason,
        } => client
            .isolate_service(pb::RollbackActionRequest {
                service,
                ..action(rollback_id, reason)
            })
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Start {
            change_id,
            selection,
            options,
            plan_hash,
            reason,
            break_glass,
            watch: follow,
        } => {
            let request = pb::StartRollbackRequest {
                request_id: request_id(),
                change_id: String::new(),
                reason,
                max_parallel: 0,
                selection: Some(selection.into_selection(change_id)?),
                options: Some(options.into_options()),
                plan_hash,
                break_glass,
            };
            let answer = client
                .start_rollback(request)
                .await
                .map_err(explain)?
                .into_inner();
            let Some(rollback) = answer.rollback else {
                if format == Format::Json {
                    json(&answer)?;
                } else {
                    crate::requests::print_filed(answer.request)?;
                }
                return Ok(ExitCode::SUCCESS);
            };
            if follow {
                return watch::follow(client, format, &rollback.rollback_id).await;
            }
            rollback
        }
        RollbackCommand::Status { rollback_id } => client
            .get_rollback(pb::GetRollbackRequest { rollback_id })
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback in the answer")?,
        RollbackCommand::List { page } => {
            let rollbacks = client
                .list_rollbacks(pb::ListRollbacksRequest {
                    limit: page.limit,
                    before: page.before,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&rollbacks)?;
            } else {
                let rows = rollbacks
                    .rollbacks
                    .iter()
                    .map(|rollback| {
                        vec![
                            rollback.rollback_id.clone(),
                            rollback.change_ids.join(","),
                            rollback.services.join(","),
                            output::rollback_state(rollback).into(),
                            output::trigger_of(rollback),
                            time(rollback.started_at_ms),
                            time(rollback.finished_at_ms),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ROLLBACK", "CHANGES", "SERVICES", "STATE", "TRIGGER", "STARTED",
                        "FINISHED",
                    ],
                    rows,
                );
                next_page("rollback list", page.limit, &rollbacks.next_before);
            }
            return Ok(ExitCode::SUCCESS);
        }
        RollbackCommand::Watch { rollback_id } => {
            return watch::follow(client, format, &rollback_id).await;
        }
        RollbackCommand::Pause {
            rollback_id,
            reason,
        } => client
            .pause_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Resume {
            rollback_id,
            reason,
        } => client
            .resume_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
        RollbackCommand::Abort {
            rollback_id,
            reason,
        } => client
            .abort_rollback(action(rollback_id, reason))
            .await
            .map_err(explain)?
            .into_inner()
            .rollback
            .context("no rollback")?,
    };
    if format == Format::Json {
        json(&rollback)?;
    } else {
        output::print_rollback(&rollback);
    }
    Ok(ExitCode::SUCCESS)
}

async fn trigger(
    client: &mut client::Client,
    format: Format,
    command: TriggerCommand,
) -> anyhow::Result<ExitCode> {
    let answer = match command {
        TriggerCommand::List { limit } => client
            .list_triggers(pb::ListTriggersRequest { limit })
            .await
            .map_err(explain)?
            .into_inner(),
        TriggerCommand::ResetBreaker { reason } => client
            .reset_breaker(pb::ResetBreakerRequest {
                request_id: request_id(),
                reason,
            })
            .await
            .map_err(explain)?
            .into_inner(),
    };
    if format == Format::Json {
        json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    if answer.breaker_open {
        say!(
            "GLOBAL BREAKER OPEN since {} ({} triggered together): no automatic rollback starts \
             until `rewindctl trigger reset-breaker --reason ...`",
            time(answer.breaker_tripped_at_ms),
            answer.breaker_services.join(", ")
        );
    } else {
        say!("global breaker: closed");
    }
    let rows = answer
        .triggers
        .iter()
        .map(|event| {
            vec![
                time(event.at_ms),
                event.service.clone(),
                event.environment.clone(),
                event.source.clone(),
                event.outcome.clone(),
                event.change_id.clone(),
                event.rollback_id.clone(),
                event.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "AT", "SERVICE", "ENV", "SOURCE", "OUTCOME", "CHANGE", "ROLLBACK", "DETAIL",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn audit(
    client: &mut client::Client,
    format: Format,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::List { from, limit } => {
            let entries = client
                .list_audit(pb::ListAuditRequest {
                    from_index: from,
                    limit,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&entries)?;
            } else {
                let rows = entries
                    .entries
                    .iter()
                    .map(|entry| {
                        vec![
                            entry.index.to_string(),
                            time(entry.at_ms),
                            entry.identity.clone(),
                            entry.action.clone(),
                            entry.target.clone(),
                            entry.outcome.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["#", "AT", "IDENTITY", "ACTION", "TARGET", "OUTCOME"],
                    rows,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify => {
            let verification = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if format == Format::Json {
                json(&verification)?;
            } else if verification.ok {
                say!(
                    "audit chain intact: {} entries, head {}",
                    verification.entries,
                    verification.head_hash
                );
            } else {
                say!(
                    "audit chain BROKEN at entry {}: {}",
                    verification.first_broken_index,
                    verification.detail
                );
            }
            Ok(if verification.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_back_to_what_was_written_or_say_what_is_wrong() {
        for text in [
            "error_ratio > 0.05 for 30s",
            "p99_latency_ms > 2x baseline for 60s",
            "probe_failure_ratio > 0.2 for 10s",
        ] {
            let condition = parse_condition(text).unwrap();
            assert_eq!(describe_condition(&condition), text);
        }
        let relative = parse_condition("p99_latency_ms>1.5x baseline for 5s").unwrap();
        assert!(relative.relative_to_baseline && relative.threshold == 1.5);
        for (bad, why) in [
            ("error_ratio 0.05 for 30s", "no '>'"),
            ("errors > 0.05 for 30s", "unknown figure \"errors\""),
            ("error_ratio > 0.05", "no `for Ns` window"),
            ("error_ratio > lots for 30s", "\"lots\" in"),
            ("error_ratio > 2 baseline for 30s", "like `2x baseline`"),
            ("error_ratio > 0.05 for 0s", "whole seconds"),
            ("error_ratio > 0.05 for 1m", "whole seconds"),
        ] {
            let error = parse_condition(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn release_requirements_and_synthetic_checks_parse_or_say_what_is_wrong() {
        assert_eq!(parse_requirement("api=3"), Ok(("api".to_string(), 3)));
        assert!(
            parse_requirement("api")
                .unwrap_err()
                .contains("PROVIDER=VERSION")
        );
        assert!(
            parse_requirement("api=x")
                .unwrap_err()
                .contains("not a whole number")
        );

        let check = parse_synthetic(
            "name=checkout,url=http://h/c,method=POST,expect-status=201,body-contains=ok,max-latency-ms=500",
        )
        .unwrap();
        assert_eq!(
            (
                check.name.as_str(),
                check.expect_status,
                check.max_latency_ms
            ),
            ("checkout", 201, 500)
        );
        assert!(
            parse_synthetic("url=http://h")
                .unwrap_err()
                .contains("name= and url=")
        );
        assert!(
            parse_synthetic("name=a,colour=red")
                .unwrap_err()
                .contains("unknown key \"colour\"")
        );
        assert!(
            parse_synthetic("name=a,url")
                .unwrap_err()
                .contains("key=value")
        );
    }
}
