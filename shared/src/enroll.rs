//! Getting a certificate from the cluster and renewing it, for agents and `rewindctl`.
//!
//! The holder makes its key and a CSR here; the key is written beside the certificate and never
//! sent. Joining presents a one-time token over TLS that trusts the cluster's CA and accepts only
//! a member's certificate, presenting none of its own; renewing presents the current
//! certificate. Either way the files are replaced whole, and what reads them (the next
//! connection, the coordinator's reloader) picks them up without a restart.

use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_proto::v1::join_service_client::JoinServiceClient;
use tonic::transport::Endpoint;

use crate::SharedError;
use crate::identity::certificate_identity;
use crate::member_tls::MemberConnector;
use crate::pki::{Subject, install, make_csr};
use crate::tls::TlsFiles;

/// Metadata key in which a member that is not the leader names the leader's address.
pub const LEADER_METADATA_KEY: &str = "rewind-leader";
/// Longest one attempt (connect and call) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most "the leader is elsewhere" answers followed in one enrolment.
const MAX_REDIRECTS: usize = 3;

/// What proves the holder may have the certificate.
#[derive(Clone, Copy, Debug)]
pub enum Credential<'a> {
    /// A one-time join token (`jt-3.<secret>`).
    Token(&'a str),
    /// The holder's current certificate, in the files being replaced.
    Current,
}

/// Why no certificate was had.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// No member could be reached or none answered in time: worth trying again later.
    #[error("no coordinator issued the certificate: {0}")]
    Unreachable(String),
    /// The cluster answered no (a used token, a revoked identity): asking again gets the same.
    #[error("the cluster refused: {0}")]
    Refused(String),
    /// Something here: the files, the key, the certificate issued.
    #[error(transparent)]
    Local(#[from] SharedError),
}

/// What the cluster issued and where it was written.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub identity: String,
    pub not_after_s: i64,
}

/// Gets a certificate for `subject` from the first member of `addresses` that can issue it
/// (following the leader), and writes it and its new key to `files` (the CA file must hold the
/// cluster's CA already: it is what the members are checked against).
pub async fn enroll(
    addresses: &[String],
    server_name: Option<&str>,
    files: &TlsFiles,
    subject: &Subject,
    credential: Credential<'_>,
) -> Result<Enrolled, EnrollError> {
    if addresses.is_empty() {
        return Err(EnrollError::Unreachable(
            "no coordinator address to enrol with".into(),
        ));
    }
    let (csr_pem, key_pem) = make_csr(subject, &[])?;
    let connector = match credential {
        Credential::Token(_) => MemberConnector::anonymous(&files.ca)?,
        Credential::Current => MemberConnector::new(files, false)?,
    }
    .with_server_name(server_name);
    let mut queue: std::collections::VecDeque<String> = addresses.iter().cloned().collect();
    let mut redirects = 0;
    let mut errors = Vec::new();
    while let Some(address) = queue.pop_front() {
        let attempt = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            ask(&address, connector.clone(), &csr_pem, credential),
        )
        .await
        .unwrap_or_else(|_| Err(Answer::Unreachable("timed out".into())));
        match attempt {
            Ok(issued) => {
                check_issued(&issued, subject)?;
                install(files, &issued.certificate_chain_pem, &key_pem)?;
                return Ok(Enrolled {
                    identity: issued.identity,
                    not_after_s: issued.not_after_s,
                });
            }
            Err(Answer::Leader(leader)) if redirects < MAX_REDIRECTS => {
                redirects += 1;
                queue.push_front(leader);
            }
            Err(Answer::Leader(leader)) => {
                errors.push(format!("{address}: the leader is at {leader}"));
            }
            Err(Answer::Unreachable(error)) => errors.push(format!("{address}: {error}")),
            // The cluster answered and said no: asking another member gets the same answer.
            Err(Answer::Refused(error)) => return Err(EnrollError::Refused(error)),
        }
    }
    Err(EnrollError::Unreachable(errors.join("; ")))
}

enum Answer {
    Leader(String),
    Unreachable(String),
    Refused(String),
}

async fn ask(
    address: &str,
    connector: MemberConnector,
    csr_pem: &str,
    credential: Credential<'_>,
) -> Result<pb::IssuedCertificate, Answer> {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|error| Answer::Refused(format!("coordinator address {address:?}: {error}")))?
        .connect_timeout(ATTEMPT_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|error| Answer::Unreachable(error_chain(&error)))?;
    let mut client = JoinServiceClient::new(channel);
    let answer = match credential {
        Credential::Token(token) => {
            client
                .join(pb::JoinRequest {
                    token: token.to_string(),
                    csr_pem: csr_pem.to_string(),
                })
                .await
        }
        Credential::Current => {
            client
                .renew(pb::RenewRequest {
                    csr_pem: csr_pem.to_string(),
                })
                .await
        }
    };
    answer.map(tonic::Response::into_inner).map_err(|status| {
        if let Some(leader) = status
            .metadata()
            .get(LEADER_METADATA_KEY)
            .and_then(|value| value.to_str().ok())
        {
            return Answer::Leader(leader.to_string());
        }
        let message = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                Answer::Unreachable(message)
            }
            _ => Answer::Refused(message),
        }
    })
}

/// The certificate issued names the identity asked for.
fn check_issued(issued: &pb::IssuedCertificate, subject: &Subject) -> Result<(), SharedError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let leaf = CertificateDer::from_pem_slice(issued.certificate_chain_pem.as_bytes())
        .map_err(|error| SharedError::Certificate(format!("the issued certificate: {error}")))?;
    let identity = certificate_identity(leaf.as_ref())?;
    if identity.kind != subject.kind || identity.name != subject.name {
        return Err(SharedError::Certificate(format!(
            "the cluster issued a certificate for {}, not the one asked for",
            identity.principal()
        )));
    }
    Ok(())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the certificate in `files` should be renewed now: unreadable, or in the last third of
/// its life. Also answers when it expires.
pub fn renewal_due(files: &TlsFiles) -> (bool, Option<i64>) {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let identity = CertificateDer::from_pem_file(&files.cert)
        .ok()
        .and_then(|der| certificate_identity(der.as_ref()).ok());
    match identity {
        Some(identity) => (
            crate::pki::renewal_due(
                identity.not_before_s,
                identity.not_after_s,
                crate::time::now_s(),
            ),
            Some(identity.not_after_s),
        ),
        None => (true, None),
    }
}
