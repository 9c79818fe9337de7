//! The agent's certificate: joining the cluster with a one-time token on first start (or when
//! its certificate is unusable: expired, or not matching its key), and renewing before the
//! certificate expires, without a restart (the next connection reads the new files).

use std::time::Duration;

use anyhow::Context as _;
use rewind_shared::enroll::{
    Credential, EnrollError, Enrolled, Enrolment, KeyAndCsr, enroll, read_token_file, renewal_due,
};
use rewind_shared::identity::Kind;
use rewind_shared::pki::Subject;
use tracing::{info, warn};

use crate::config::Config;

/// How often the certificate's age is checked, at most and at least.
const CHECK_AT_MOST_EVERY: Duration = Duration::from_secs(600);
const CHECK_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// Joins tried on first start before giving up (the coordinators may be starting too).
const JOIN_ATTEMPTS: u32 = 30;

fn enrolment<'a>(config: &'a Config, subject: &'a Subject) -> Enrolment<'a> {
    Enrolment {
        addresses: &config.coordinators,
        server_name: config.coordinator_name.as_deref(),
        files: &config.tls,
        subject,
        accept_legacy: config.legacy_certificates,
    }
}

/// Joins the cluster with `token` (retrying, with one key, while no member can be reached):
/// writes this host's new key and certificate where the config's `[tls]` says.
pub async fn join(config: &Config, token: &str) -> anyhow::Result<Enrolled> {
    let subject = Subject::new(Kind::Agent, &config.host_id);
    let key = KeyAndCsr::new(&subject)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match enroll(&enrolment(config, &subject), Credential::Token(token), &key).await {
            Ok(enrolled) => {
                info!(identity = enrolled.identity, not_after_s = enrolled.not_after_s, certificate = %config.tls.cert.display(), "Joined the cluster: certificate written.");
                return Ok(enrolled);
            }
            // A refusal (a used or wrong token) will not change; unreachable members might.
            Err(EnrollError::Unreachable(error)) if attempt < JOIN_ATTEMPTS => {
                warn!(error, attempt, "Cannot join yet; trying again.");
                tokio::time::sleep(crate::connection::backoff(attempt)).await;
            }
            Err(error) => return Err(error).context("join the cluster"),
        }
    }
}

/// On first start, or with an unusable certificate (missing, expired, not its key's), joins with
/// `join-token-file`. Does nothing when the certificate is usable.
pub async fn join_if_needed(config: &Config) -> anyhow::Result<()> {
    let problem = match rewind_shared::pki::check_files(&config.tls) {
        Ok(()) => return Ok(()),
        Err(problem) => problem,
    };
    let Some(path) = &config.join_token_file else {
        if !config.tls.cert.exists() {
            anyhow::bail!(
                "{} does not exist and no join-token-file is set: create a token with \
                 `rewindctl join-token create --kind agent --name {}` and name its file in \
                 join-token-file",
                config.tls.cert.display(),
                config.host_id
            );
        }
        // Connecting will say what is wrong; a certificate renewed by hand may yet arrive.
        warn!(%problem, "The agent's certificate is not usable and no join-token-file is set.");
        return Ok(());
    };
    if !path.exists() && config.tls.cert.exists() {
        // The token was used and removed (as the Ansible role does): nothing to join with.
        warn!(%problem, token_file = %path.display(), "The agent's certificate is not usable and its join token is gone: create one for exactly this host.");
        return Ok(());
    }
    info!(%problem, "Joining the cluster.");
    let token = read_token_file(path)?;
    join(config, &token).await.map(|_| ())
}

/// Renews the certificate once a third of its life is left, checking every tenth of what is
/// left (bounded); a failed renewal is tried again at the next check. Runs until dropped.
pub async fn renew_when_due(config: Config) {
    let subject = Subject::new(Kind::Agent, &config.host_id);
    loop {
        let (due, not_after_s) = renewal_due(&config.tls);
        if due {
            let renewed = match KeyAndCsr::new(&subject) {
                Ok(key) => enroll(&enrolment(&config, &subject), Credential::Current, &key)
                    .await
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match renewed {
                Ok(enrolled) => {
                    info!(
                        not_after_s = enrolled.not_after_s,
                        "Certificate renewed; new connections present it."
                    )
                }
                Err(error) => {
                    warn!(
                        error,
                        expires_at_s = not_after_s,
                        "Cannot renew the certificate yet; trying again."
                    )
                }
            }
        }
        let left_s = not_after_s
            .map(|not_after| (not_after - rewind_shared::time::now_s()).max(0) as u64)
            .unwrap_or(60);
        let wait =
            Duration::from_secs(left_s / 10).clamp(CHECK_AT_LEAST_EVERY, CHECK_AT_MOST_EVERY);
        tokio::time::sleep(wait).await;
    }
}
