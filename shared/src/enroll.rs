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
use crate::errors::error_chain;
use crate::identity::certificate_identity;
use crate::member_tls::MemberConnector;
use crate::pki::{Subject, install, make_csr};
use crate::tls::TlsFiles;

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

/// Where and as whom to enrol.
#[derive(Clone, Debug)]
pub struct Enrolment<'a> {
    /// Coordinator members, host:port.
    pub addresses: &'a [String],
    /// A name every member's certificate must carry instead of the host dialled.
    pub server_name: Option<&'a str>,
    /// Where the certificate and key go; the CA file must hold the cluster's CA already.
    pub files: &'a TlsFiles,
    pub subject: &'a Subject,
    /// Accept members' certificates without a kind (the compatibility switch).
    pub accept_legacy: bool,
}

/// A new key and a CSR for it: made once and reused across retries, so a join whose answer was
/// lost is asked again with the same key (and the cluster counts it once).
pub struct KeyAndCsr {
    csr_pem: String,
    key_pem: String,
}

impl KeyAndCsr {
    pub fn new(subject: &Subject) -> Result<Self, SharedError> {
        let (csr_pem, key_pem) = make_csr(subject, &[])?;
        Ok(Self { csr_pem, key_pem })
    }
}

/// Gets a certificate for the enrolment's subject from the first member that can issue it
/// (following the leader), and writes it and `key`'s key to the enrolment's files.
pub async fn enroll(
    enrolment: &Enrolment<'_>,
    credential: Credential<'_>,
    key: &KeyAndCsr,
) -> Result<Enrolled, EnrollError> {
    if enrolment.addresses.is_empty() {
        return Err(EnrollError::Unreachable(
            "no coordinator address to enrol with".into(),
        ));
    }
    let connector = match credential {
        Credential::Token(_) => MemberConnector::anonymous(&enrolment.files.ca)?,
        Credential::Current => MemberConnector::new(enrolment.files, enrolment.accept_legacy)?,
    }
    .with_server_name(enrolment.server_name);
    let mut queue: std::collections::VecDeque<String> =
        enrolment.addresses.iter().cloned().collect();
    let mut redirects = 0;
    let mut errors = Vec::new();
    while let Some(address) = queue.pop_front() {
        let attempt = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            ask(&address, connector.clone(), &key.csr_pem, credential),
        )
        .await
        .unwrap_or_else(|_| Err(Answer::Unreachable("timed out".into())));
        match attempt {
            Ok(issued) => {
                check_issued(&issued, enrolment.subject)?;
                install(enrolment.files, &issued.certificate_chain_pem, &key.key_pem)?;
                return Ok(Enrolled {
                    identity: crate::names::printable(&issued.identity, 128),
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

/// Most bytes of a join token file.
const MAX_TOKEN_FILE_BYTES: u64 = 1024;

/// Reads a join token file: one line, the token.
pub fn read_token_file(path: &std::path::Path) -> Result<String, SharedError> {
    let invalid = |message: String| SharedError::Invalid {
        field: path.display().to_string(),
        message,
    };
    let size = std::fs::metadata(path)
        .map_err(|source| SharedError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(invalid(format!(
            "{size} bytes is not a join token (at most {MAX_TOKEN_FILE_BYTES})"
        )));
    }
    let text = crate::pki::read_string(path)?;
    parse_token_text(&text).map_err(invalid)
}

/// A token as typed or read: one line of printable ASCII.
pub fn parse_token_text(text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "expected one line holding the token `rewindctl join-token create` printed".into(),
        );
    }
    Ok(token.to_string())
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
            .get(crate::LEADER_METADATA_KEY)
            .and_then(|value| value.to_str().ok())
        {
            return Answer::Leader(leader.to_string());
        }
        let message = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                Answer::Unreachable(message)
            }
            _ => Answer::Refused(crate::names::printable(&message, 512)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_must_hold_one_printable_line_of_bounded_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "jt-3.abc\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "jt-3.abc");
        for (contents, says) in [
            ("x".repeat(2048), "is not a join token"),
            ("  \n".to_string(), "expected one line"),
            ("jt-3.\u{1b}[2Jabc".to_string(), "expected one line"),
        ] {
            std::fs::write(&path, contents).unwrap();
            let error = read_token_file(&path).unwrap_err().to_string();
            assert!(error.contains(says) && error.contains("token"), "{error}");
        }
        let missing = read_token_file(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().contains("none"), "{missing}");
    }
}
