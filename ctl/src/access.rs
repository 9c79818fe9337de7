//! `rewindctl access`: the access policy (who may do what, where) and "may X do Y?".

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;

use crate::client::{Client, explain, request_id};
use crate::output::{Format, json};

#[derive(Clone, Subcommand)]
pub enum AccessCommand {
    /// The access policy in force: show it, see what a file would change, apply a file.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// May IDENTITY (`user:alice`) do ACTION (`rollback.start`) on TARGET (`*` for the
    /// cluster, a service, or ENVIRONMENT/SERVICE)? Says which binding decides; exits 1 if not.
    Check {
        #[arg(value_name = "IDENTITY")]
        who: String,
        action: String,
        target: String,
        /// A group its certificate carries (O or OU). Repeatable.
        #[arg(long)]
        group: Vec<String>,
    },
}

#[derive(Clone, Subcommand)]
pub enum PolicyCommand {
    /// Print the policy in force (TOML), with its version and hash.
    Show,
    /// What applying FILE would change, checked by the coordinator but not applied.
    Diff { file: PathBuf },
    /// Put FILE in force (admin only; audited with what changed).
    Apply {
        file: PathBuf,
        /// Refuse if the policy in force is no longer this one (its hash from `show`).
        #[arg(long, default_value = "")]
        expected_hash: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(
    client: &mut Client,
    format: Format,
    command: AccessCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        AccessCommand::Policy(PolicyCommand::Show) => {
            let policy = client
                .get_policy(pb::GetPolicyRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&policy)?;
            } else {
                say!("# version {}, sha256 {}", policy.version, policy.hash);
                say_inline!("{}", policy.toml);
            }
        }
        AccessCommand::Policy(PolicyCommand::Diff { file }) => {
            let current = client
                .get_policy(pb::GetPolicyRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            let proposed = apply(client, &file, true, String::new(), String::new()).await?;
            if format.is_structured() {
                json(&proposed)?;
            } else {
                say!("# {}", proposed.summary);
                print_diff(&current.toml, &proposed.toml);
            }
        }
        AccessCommand::Policy(PolicyCommand::Apply {
            file,
            expected_hash,
            reason,
        }) => {
            let applied = apply(client, &file, false, expected_hash, reason).await?;
            if format.is_structured() {
                json(&applied)?;
            } else {
                say!(
                    "applied: version {}, sha256 {}\n{}",
                    applied.version,
                    applied.hash,
                    applied.summary
                );
            }
        }
        AccessCommand::Check {
            who,
            action,
            target,
            group,
        } => {
            let answer = client
                .check_access(pb::CheckAccessRequest {
                    identity: who,
                    groups: group,
                    action,
                    target,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&answer)?;
            } else {
                let verdict = if answer.allowed { "allowed" } else { "denied" };
                say!("{verdict}: {}", answer.reason);
            }
            if !answer.allowed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply(
    client: &mut Client,
    file: &PathBuf,
    dry_run: bool,
    expected_hash: String,
    reason: String,
) -> anyhow::Result<pb::Policy> {
    let toml = std::fs::read_to_string(file)
        .with_context(|| format!("read the policy file {}", file.display()))?;
    let request = pb::ApplyPolicyRequest {
        toml,
        expected_hash,
        reason,
        request_id: request_id(),
        dry_run,
    };
    Ok(client
        .apply_policy(request)
        .await
        .map_err(explain)?
        .into_inner())
}

/// A line diff of two renderings of the policy (`-` in force, `+` proposed).
fn print_diff(current: &str, proposed: &str) {
    let diff = similar::TextDiff::from_lines(current, proposed);
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        say_inline!("{sign}{change}");
    }
}
