//! The command tree and what each command does.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{self, ConnectOptions};
use crate::cmd::audit::AuditCommand;
use crate::cmd::change::ChangeCommand;
use crate::cmd::cluster::ClusterCommand;
use crate::cmd::fleet::FleetCommand;
use crate::cmd::release::ReleaseCommand;
use crate::cmd::rollback::RollbackCommand;
use crate::cmd::service::ServiceCommand;
use crate::cmd::trigger::TriggerCommand;
use crate::output::Format;

/// Exit code when a rollback ended failed or aborted.
pub const EXIT_ROLLBACK_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "rewindctl",
    version,
    about = "Drive rewind: hosts, releases, changes, rollbacks, audit"
)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectOptions,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table, env = "REWIND_OUTPUT")]
    pub output: Format,
    /// The named cluster to use (`rewindctl config get-contexts`), instead of the current one.
    #[arg(long, global = true, env = "REWIND_CONTEXT")]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Subcommand)]
pub enum Command {
    /// The old spelling of `host list` (kept for a release).
    #[command(subcommand, hide = true)]
    Fleet(FleetCommand),
    /// Hosts: list them, compare their captured or live state, show drift, forget one.
    #[command(subcommand)]
    Host(crate::hosts::HostCommand),
    /// Services, their dependencies and health policies.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Environments: compare two for parity (releases, config, schema, flags).
    #[command(subcommand)]
    Env(crate::cmd::env::EnvCommand),
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
    /// Incidents: each rollback as one (in-N for rb-N), with times, timeline, notes and its
    /// root-cause analysis.
    #[command(subcommand)]
    Incident(crate::cmd::incident::IncidentCommand),
    /// A service's rollback runbook: its recipe, policy and gates, and the lessons of its past
    /// incidents.
    #[command(subcommand)]
    Runbook(crate::cmd::runbook::RunbookCommand),
    /// Reports over the cluster's history: `report sla` measures incidents against each
    /// service's RTO.
    #[command(subcommand)]
    Report(crate::cmd::report::ReportCommand),
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
    /// Named clusters and their certificates (contexts), so the connection flags need not be
    /// typed every time.
    #[command(subcommand)]
    Config(crate::contexts::ConfigCommand),
    /// Prints a shell completion script: `source <(rewindctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Writes a man page for rewindctl and each of its commands into a directory.
    Man {
        #[arg(long, default_value = ".")]
        out_dir: std::path::PathBuf,
    },
}

/// A page of a list. Every list pages alike: `--page-size`, and the `--page-token` the
/// previous page ended with (`--limit` is the spelling before 0.3, hidden).
#[derive(Clone, clap::Args)]
pub struct PageArgs {
    /// At most this many (at most 1000).
    #[arg(long, alias = "limit", default_value_t = 100)]
    pub page_size: u32,
    /// Continue where the previous page ended (the token it printed); empty: the first page.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

/// A page of a list kept newest first by id (changes, rollbacks), where the spelling before
/// 0.3 of `--page-token` was `--before`.
#[derive(Clone, clap::Args)]
pub struct NewestPageArgs {
    #[command(flatten)]
    pub page: PageArgs,
    /// The spelling before 0.3 of `--page-token`.
    #[arg(long, hide = true, conflicts_with = "page_token")]
    pub before: Option<String>,
}

impl NewestPageArgs {
    /// The page asked for, by whichever spelling.
    pub fn page(self) -> PageArgs {
        match self.before {
            Some(before) => PageArgs {
                page_token: before,
                ..self.page
            },
            None => self.page,
        }
    }
}

/// The next page's token from an answer: `next_page_token`, or from a coordinator before 0.3
/// the `next_before` it sent instead.
pub(crate) fn next_or_legacy<'a>(next_page_token: &'a str, next_before: &'a str) -> &'a str {
    if next_page_token.is_empty() {
        next_before
    } else {
        next_page_token
    }
}

/// Says how to get the next page, when there is one: the same command, filters and size.
pub(crate) fn next_page(command: &str, page_size: u32, next_page_token: &str) {
    if !next_page_token.is_empty() {
        say!("(more: rewindctl {command} --page-size {page_size} --page-token {next_page_token})");
    }
}

/// How many times a command follows a redirect to the leader.
const MAX_REDIRECTS: usize = 3;

pub async fn run(
    cli: Cli,
    given: crate::contexts::Given,
    typed: crate::contexts::Given,
) -> anyhow::Result<ExitCode> {
    crate::output::set_format(cli.output);
    let junit_drill = matches!(
        &cli.command,
        Command::Drill(
            crate::migrations::DrillCommand::Rollback { .. }
                | crate::migrations::DrillCommand::List { .. }
        )
    ) || matches!(&cli.command, Command::Drill(crate::migrations::DrillCommand::Show { drill_id }) if drill_id.starts_with("rd-"));
    if cli.output == Format::Junit && !junit_drill {
        anyhow::bail!(
            "--output junit is for rollback fire drills only (drill rollback, drill show rd-N, \
             drill list); use table or json here"
        );
    }
    let mut options = cli.connect.clone();
    match &cli.command {
        Command::Demo(args) => return crate::demo::run(args.clone()).await,
        // Local: the contexts file, the shell, the manual.
        Command::Config(command) => {
            crate::contexts::run(command.clone(), &options, typed, cli.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Into memory first: the generator panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "rewindctl", &mut script);
            return match std::io::stdout().write_all(&script) {
                Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
                _ => Ok(ExitCode::SUCCESS),
            };
        }
        Command::Man { out_dir } => {
            use clap::CommandFactory as _;
            std::fs::create_dir_all(out_dir)?;
            clap_mangen::generate_to(Cli::command(), out_dir)?;
            say!("man pages written to {}", out_dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        // Offline: an export is verified with no cluster.
        Command::Audit(AuditCommand::Verify {
            files,
            manifest_hash,
        }) if !files.is_empty() => {
            return crate::cmd::audit::verify_files(files, manifest_hash.as_deref(), cli.output);
        }
        _ => {}
    }
    crate::contexts::apply(&mut options, given, cli.context.as_deref())?;
    if let Command::Cert(command) = &cli.command {
        return crate::join::run_cert(&options, command.clone()).await;
    }
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
        Command::Fleet(FleetCommand::List { page }) => {
            crate::cmd::fleet::fleet_list(client, format, page).await
        }
        Command::Host(command) => crate::hosts::run(client, format, command).await,
        Command::Service(command) => crate::cmd::service::service(client, format, command).await,
        Command::Env(command) => crate::cmd::env::env(client, format, command).await,
        Command::Release(command) => crate::cmd::release::release(client, format, command).await,
        Command::Migration(command) => crate::migrations::run(client, format, command).await,
        Command::Schema(command) => crate::migrations::schema(client, format, command).await,
        Command::Drill(command) => crate::migrations::drill(client, format, command).await,
        Command::Change(command) => crate::cmd::change::change(client, format, command).await,
        Command::Rollback(command) => crate::cmd::rollback::rollback(client, format, command).await,
        Command::Audit(command) => crate::cmd::audit::audit(client, format, command).await,
        Command::Incident(command) => crate::cmd::incident::incident(client, format, command).await,
        Command::Runbook(command) => crate::cmd::runbook::runbook(client, format, command).await,
        Command::Report(command) => crate::cmd::report::report(client, format, command).await,
        Command::Trigger(command) => crate::cmd::trigger::trigger(client, format, command).await,
        Command::Flag(command) => crate::flags::run(client, format, command).await,
        Command::Access(command) => crate::access::run(client, format, command).await,
        Command::Request(command) => crate::requests::run(client, format, command).await,
        Command::JoinToken(command) => crate::join::run_tokens(client, format, command).await,
        Command::Cluster(command) => crate::cmd::cluster::run(client, format, command).await,
        Command::Demo(_)
        | Command::Cert(_)
        | Command::Config(_)
        | Command::Completion { .. }
        | Command::Man { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command and subcommand says what it does in `--help`.
    #[test]
    fn every_command_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && !sub.is_hide_set() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "rewindctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {}", missing.join("; "));
    }

    /// The spellings before the command tree was made consistent still parse, for a release.
    #[test]
    fn old_spellings_are_hidden_aliases_of_the_new_ones() {
        // The chain of subcommands a line resolves to: an alias resolves to its command's name.
        let resolve = |line: &str| {
            let mut matches = Cli::command()
                .try_get_matches_from(line.split(' '))
                .unwrap_or_else(|error| panic!("{line}: {error}"));
            let mut chain = Vec::new();
            while let Some((name, sub)) = matches.remove_subcommand() {
                chain.push(name);
                matches = sub;
            }
            chain
        };
        let pairs = [
            ("rewindctl rollback status rb-1", "rollback show"),
            ("rewindctl change status ch-1", "change show"),
            ("rewindctl flag get web f", "flag show"),
            ("rewindctl service health web", "service show"),
            (
                "rewindctl drill migrations --change ch-1 --env staging --reason why",
                "drill start",
            ),
            ("rewindctl drill status dr-1", "drill show"),
        ];
        for (old, new) in pairs {
            assert_eq!(resolve(old).join(" "), new, "{old}");
        }
        // Hidden: `--help` names only the new spellings.
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("fleet"), "{help}");
        let rollback_help = Cli::command()
            .find_subcommand_mut("rollback")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!rollback_help.contains("status"), "{rollback_help}");
        // What is audited needs a reason.
        assert!(Cli::try_parse_from(["rewindctl", "rollback", "abort", "rb-1"]).is_err());
    }

    #[test]
    fn every_action_that_is_audited_needs_a_reason() {
        let actions = [
            "change start web v2",
            "rollback start ch-1",
            "rollback pause rb-1",
            "rollback resume rb-1",
            "rollback abort rb-1",
            "rollback skip-host rb-1 web-1",
            "rollback isolate rb-1 web",
            "flag set web f on",
            "flag kill web f",
            "trigger reset-breaker",
            "request approve req-1 --plan-hash h",
            "request deny req-1",
            "request review req-1",
            "access policy apply policy.toml",
            "join-token create --kind user --name carol",
            "join-token revoke jt-1",
            "host forget web-1",
            "schema resolved st-1 --shard db-1",
            "drill start --change ch-1 --env staging",
            "cluster transfer-leader 2",
            "cluster add 4 --address a:1",
            "cluster remove 4",
            "cluster upgrade-finalize",
        ];
        for action in actions {
            let line = format!("rewindctl {action}");
            let error = match Cli::try_parse_from(line.split(' ')) {
                Ok(_) => panic!("{action}: accepted without --reason"),
                Err(error) => error.to_string(),
            };
            assert!(error.contains("--reason"), "{action}: {error}");
            Cli::try_parse_from(format!("{line} --reason why").split(' '))
                .unwrap_or_else(|error| panic!("{action} --reason why: {error}"));
        }
    }

    #[test]
    fn every_list_pages_alike_and_the_old_page_flags_still_parse() {
        for list in [
            "host list",
            "change list",
            "rollback list",
            "audit list",
            "schema list",
            "join-token list",
            "request list",
        ] {
            let line = format!("rewindctl {list} --page-size 5 --page-token t");
            Cli::try_parse_from(line.split(' ')).unwrap_or_else(|error| panic!("{line}: {error}"));
        }
        for old in [
            "rewindctl change list --limit 5 --before ch-3",
            "rewindctl rollback list --limit 5 --before rb-3",
            "rewindctl audit list --from 7 --limit 5",
            "rewindctl trigger list --limit 5",
        ] {
            Cli::try_parse_from(old.split(' ')).unwrap_or_else(|error| panic!("{old}: {error}"));
        }
        // An old spelling and the new one at once is a mistake, not a choice.
        for both in [
            "rewindctl change list --before ch-3 --page-token ch-9",
            "rewindctl audit list --from 7 --page-token 9",
        ] {
            assert!(Cli::try_parse_from(both.split(' ')).is_err(), "{both}");
        }
        let help = Cli::command()
            .find_subcommand_mut("change")
            .and_then(|change| change.find_subcommand_mut("list"))
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("--page-token") && !help.contains("--before"),
            "{help}"
        );
    }

    #[test]
    fn a_gate_settles_in_seconds_or_in_milliseconds_never_both() {
        let line = "rewindctl rollback start ch-1 --reason why";
        for settle in ["--gate-settle-s 2", "--gate-settle-ms 200"] {
            Cli::try_parse_from(format!("{line} {settle}").split(' '))
                .unwrap_or_else(|error| panic!("{settle}: {error}"));
        }
        let both = format!("{line} --gate-settle-s 2 --gate-settle-ms 200");
        let Err(error) = Cli::try_parse_from(both.split(' ')) else {
            panic!("both settle flags were accepted");
        };
        assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(error.to_string().contains("--gate-settle-ms"), "{error}");
    }
}
