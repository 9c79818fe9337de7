//! The agent's certificate: joining the cluster with a one-time token on first start, and
//! renewing before the certificate expires, without a restart (the next connection reads the
//! new files).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rewind_shared::enroll::{Credential, EnrollError, Enrolled, enroll, renewal_due};
use rewind_shared::identity::Kind;
use rewind_shared::pki::Subject;
use tracing::{info, warn};

use crate::config::Config;

/// Longest a join token file may be.
const MAX_TOKEN_FILE_BYTES: u64 = 1024;
/// How often the certificate's age is checked, at most and at least.
const CHECK_AT_MOST_EVERY: Duration = Duration::from_secs(600);
const CHECK_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// Joins tried on first start before giving up (the coordinators may be starting too).
const JOIN_ATTEMPTS: u32 = 30;

fn subject(config: &Config) -> Subject {
    Subject::new(Kind::Agent, &config.host_id)
}

/// Reads a join token file: one line, the token.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("read the join token {}", path.display()))?
        .len();
    anyhow::ensure!(
        size <= MAX_TOKEN_FILE_BYTES,
        "{}: {size} bytes is not a join token (at most {MAX_TOKEN_FILE_BYTES})",
        path.display()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the join token {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic()),
        "{}: expected one line holding the token `rewindctl join-token create` printed",
        path.display()
    );
    Ok(token.to_string())
}

/// Joins the cluster with `token`: writes this host's new key and certificate where the config's
/// `[tls]` says.
pub async fn join(config: &Config, token: &str) -> anyhow::Result<Enrolled> {
    let enrolled = enroll(
        &config.coordinators,
        config.coordinator_name.as_deref(),
        &config.tls,
        &subject(config),
        Credential::Token(token),
    )
    .await
    .context("join the cluster")?;
    info!(identity = enrolled.identity, not_after_s = enrolled.not_after_s, certificate = %config.tls.cert.display(), "Joined the cluster: certificate written.");
    Ok(enrolled)
}

/// On first start (no certificate yet) joins with `join-token-file`, retrying while the
/// coordinators come up. Does nothing when the certificate exists.
pub async fn join_if_needed(config: &Config) -> anyhow::Result<()> {
    if config.tls.cert.exists() && config.tls.key.exists() {
        return Ok(());
    }
    let Some(path) = &config.join_token_file else {
        anyhow::bail!(
            "{} does not exist and no join-token-file is set: create a token with `rewindctl \
             join-token create --kind agent --name {}` and name its file in join-token-file",
            config.tls.cert.display(),
            config.host_id
        );
    };
    let token = read_token(path)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match join(config, &token).await {
            Ok(_) => return Ok(()),
            // Refusals (a used or wrong token) will not change; unreachable members might.
            Err(error)
                if attempt < JOIN_ATTEMPTS
                    && matches!(
                        error.downcast_ref::<EnrollError>(),
                        Some(EnrollError::Unreachable(_))
                    ) =>
            {
                warn!(
                    error = format!("{error:#}"),
                    attempt, "Cannot join yet; trying again."
                );
                tokio::time::sleep(crate::connection::backoff(attempt)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Renews the certificate once a third of its life is left, checking every tenth of its life
/// (bounded); a failed renewal is tried again at the next check. Runs until dropped.
pub async fn renew_when_due(config: Config) {
    loop {
        let (due, not_after_s) = renewal_due(&config.tls);
        if due {
            match enroll(
                &config.coordinators,
                config.coordinator_name.as_deref(),
                &config.tls,
                &subject(&config),
                Credential::Current,
            )
            .await
            {
                Ok(enrolled) => {
                    info!(
                        not_after_s = enrolled.not_after_s,
                        "Certificate renewed; new connections present it."
                    )
                }
                Err(error) => {
                    warn!(%error, expires_at_s = not_after_s, "Cannot renew the certificate yet; trying again.")
                }
            }
        }
        let lifetime_s = not_after_s
            .map(|not_after| (not_after - rewind_shared::time::now_s()).max(0) as u64)
            .unwrap_or(60);
        let wait =
            Duration::from_secs(lifetime_s / 10).clamp(CHECK_AT_LEAST_EVERY, CHECK_AT_MOST_EVERY);
        tokio::time::sleep(wait).await;
    }
}
