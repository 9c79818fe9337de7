//! `rewindctl join-token` (admins hand out one-time join tokens) and `rewindctl cert` (a person
//! or a tool gets its own certificate with one, and renews it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use rewind_proto::v1 as pb;
use rewind_shared::enroll::{Credential, Enrolment, KeyAndCsr, enroll};
use rewind_shared::identity::Kind;
use rewind_shared::pki::Subject;

use crate::client::{Client, ConnectOptions, explain, request_id};
use crate::output::{Format, json, table, time};
use rewind_shared::names::printable;

#[derive(Clone, Subcommand)]
pub enum JoinTokenCommand {
    /// Create a one-time token; printed once (only its hash is kept).
    Create {
        /// agent, user, automation or member.
        #[arg(long)]
        kind: String,
        /// The names it may be used for: a name, or a prefix ending in '*' ("web-*").
        #[arg(long)]
        name: String,
        /// Agents: the environment the host must then report (its labels.environment).
        #[arg(long, default_value = "")]
        environment: String,
        /// How long it is good for, e.g. 15m (at most 24h).
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// How many joins it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// A group the issued certificates carry (users and automation); at most two.
        #[arg(long)]
        group: Vec<String>,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Tokens, newest first, with who used them, a page at a time.
    List {
        #[command(flatten)]
        page: crate::commands::PageArgs,
    },
    /// Make a token unusable at once.
    Revoke {
        token_id: String,
        /// Why (required: it goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

pub async fn run_tokens(
    client: &mut Client,
    format: Format,
    command: JoinTokenCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        JoinTokenCommand::Create {
            kind,
            name,
            environment,
            ttl,
            uses,
            group,
            reason,
        } => {
            let ttl_s = humantime::parse_duration(&ttl)
                .with_context(|| format!("--ttl {ttl:?} (e.g. 15m)"))?
                .as_secs();
            anyhow::ensure!(
                ttl_s > 0,
                "--ttl {ttl:?}: a token must live at least a second"
            );
            let created = client
                .create_join_token(pb::CreateJoinTokenRequest {
                    request_id: request_id(),
                    kind,
                    name_pattern: name,
                    environment,
                    ttl_s,
                    uses,
                    groups: group,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&created)?;
            } else {
                let details = created.details.unwrap_or_default();
                say_err!(
                    "{}: {} {} for {} use(s) until {} (shown once; keep it secret)",
                    details.token_id,
                    details.kind,
                    details.name_pattern,
                    details.uses,
                    time(details.expires_at_ms)
                );
                say!("{}", created.token);
            }
        }
        JoinTokenCommand::List { page } => {
            let listed = client
                .list_join_tokens(pb::ListJoinTokensRequest {
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&listed)?;
            } else {
                let rows = listed
                    .tokens
                    .iter()
                    .map(|token| {
                        [
                            token.token_id.clone(),
                            token.status.clone(),
                            token.kind.clone(),
                            token.name_pattern.clone(),
                            token.environment.clone(),
                            format!("{}/{}", token.used_by.len(), token.uses),
                            token.used_by.join(","),
                            token.created_by.clone(),
                            time(token.expires_at_ms),
                        ]
                        .iter()
                        .map(|cell| printable(cell, 256))
                        .collect()
                    })
                    .collect();
                table(
                    &[
                        "TOKEN", "STATUS", "KIND", "NAMES", "ENV", "USED", "USED BY", "BY",
                        "EXPIRES",
                    ],
                    rows,
                );
                crate::commands::next_page(
                    "join-token list",
                    page.page_size,
                    &listed.next_page_token,
                );
            }
        }
        JoinTokenCommand::Revoke { token_id, reason } => {
            let token = client
                .revoke_join_token(pb::RevokeJoinTokenRequest {
                    request_id: request_id(),
                    token_id,
                    reason,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if format.is_structured() {
                json(&token)?;
            } else {
                say!("{} revoked", token.token_id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Subcommand)]
pub enum CertCommand {
    /// Get your own certificate with a join token: makes a key and a CSR here, has a
    /// coordinator sign it, and writes both where --tls-dir/--identity (or --cert/--key) say.
    /// The CA file must be there already (the cluster's ca.pem).
    Join {
        /// The file holding the token (`-` for standard input).
        #[arg(long)]
        token_file: PathBuf,
        /// user or automation.
        #[arg(long, default_value = "user")]
        kind: String,
    },
    /// Renew your certificate before it expires (the same identity and groups, a fresh
    /// lifetime).
    Renew,
}

pub async fn run_cert(options: &ConnectOptions, command: CertCommand) -> anyhow::Result<ExitCode> {
    let files = options.tls_files();
    let kind_and_credential = match &command {
        CertCommand::Join { token_file, kind } => {
            let kind = Kind::parse(kind)?;
            anyhow::ensure!(
                matches!(kind, Kind::User | Kind::Automation),
                "--kind {kind}: rewindctl joins people and automation; agents join with \
                 `rewind-agent join`"
            );
            let token = if token_file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(std::io::stdin(), 1024),
                    &mut text,
                )
                .context("read the token from standard input")?;
                rewind_shared::enroll::parse_token_text(&text).map_err(anyhow::Error::msg)?
            } else {
                rewind_shared::enroll::read_token_file(token_file)?
            };
            (kind, options.identity.clone(), Some(token))
        }
        CertCommand::Renew => {
            let chain = rewind_shared::member_tls::pem_certificates(&files.cert)?;
            let identity = rewind_shared::identity::certificate_identity(chain[0].as_ref())?;
            let kind = identity.kind.context(
                "this certificate has no rewind:// identity (issued before kinds): join with a token instead",
            )?;
            (kind, identity.name, None)
        }
    };
    let (kind, name, token) = kind_and_credential;
    let subject = Subject::new(kind, &name);
    let credential = match &token {
        Some(token) => Credential::Token(token),
        None => Credential::Current,
    };
    let enrolment = Enrolment {
        addresses: std::slice::from_ref(&options.coordinator),
        server_name: Some(&options.server_name),
        files: &files,
        subject: &subject,
        accept_legacy: false,
    };
    let enrolled = enroll(&enrolment, credential, &KeyAndCsr::new(&subject)?).await?;
    say!(
        "{}: {} valid until {}",
        enrolled.identity,
        files.cert.display(),
        time(
            u64::try_from(enrolled.not_after_s)
                .unwrap_or(0)
                .saturating_mul(1000)
        )
    );
    Ok(ExitCode::SUCCESS)
}
