//! Who a caller is, read from its certificate: a kind that cannot be confused, a name, groups.
//!
//! A rewind certificate names its holder in one URI subject alternative name,
//! `rewind://<kind>/<name>`: `rewind://member/2`, `rewind://agent/web-1`, `rewind://user/alice`,
//! `rewind://automation/alertmanager`. Any CA can put one there (step-ca, Vault PKI and cfssl all
//! take URI SANs), so a real PKI issues the same certificates as the dev CA. Groups are the
//! subject's organisation (O) and organisational unit (OU) values.
//!
//! A certificate without such a URI (issued before kinds existed) has no kind; the coordinator
//! accepts it only behind its logged compatibility switch.

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::SharedError;
use crate::names::validate_name;

/// The scheme of the URI SAN that names a certificate's kind and holder.
pub const URI_SCHEME: &str = "rewind://";
/// Most groups (O and OU values) read from one certificate.
pub const MAX_GROUPS: usize = 16;
/// Longest group name.
pub const MAX_GROUP_LEN: usize = 64;

/// What a certificate's holder is, and so which service it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A coordinator member: the Raft and member services only. Its name is its member id.
    Member,
    /// A host's agent: the agent service only, as the host its name gives.
    Agent,
    /// A person: the control service, with what the policy's bindings allow.
    User,
    /// A tool or pipeline acting on its own: the control service, like a person, but it can
    /// never approve.
    Automation,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Member, Kind::Agent, Kind::User, Kind::Automation];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Agent => "agent",
            Self::User => "user",
            Self::Automation => "automation",
        }
    }

    pub fn parse(text: &str) -> Result<Self, SharedError> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                SharedError::Certificate(format!(
                    "kind {text:?} is not one of member, agent, user, automation"
                ))
            })
    }

    /// The URI SAN naming `name` as this kind.
    pub fn uri(self, name: &str) -> String {
        format!("{URI_SCHEME}{}/{name}", self.as_str())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A caller as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// `None` for a certificate issued before kinds (no `rewind://` URI).
    pub kind: Option<Kind>,
    /// The name in the URI; the common name for a certificate without kind.
    pub name: String,
    /// The subject's common name.
    pub common_name: String,
    /// The subject's O and OU values.
    pub groups: Vec<String>,
    /// When the certificate became and stops being valid, seconds since the epoch.
    pub not_before_s: i64,
    pub not_after_s: i64,
}

impl PeerIdentity {
    /// `kind:name`, as the policy and the audit log write it; `legacy:CN` without a kind.
    pub fn principal(&self) -> String {
        match self.kind {
            Some(kind) => format!("{kind}:{}", self.name),
            None => format!("legacy:{}", self.name),
        }
    }
}

/// Reads the identity of the leaf certificate a peer presented (the TLS layer has already checked
/// it chains to the cluster's CA).
pub fn peer_identity(peer_certs: &[CertificateDer<'_>]) -> Result<PeerIdentity, SharedError> {
    let leaf = peer_certs
        .first()
        .ok_or_else(|| SharedError::Certificate("the peer presented no certificate".into()))?;
    certificate_identity(leaf.as_ref())
}

/// The identity a DER certificate names, or why it names none.
pub fn certificate_identity(der: &[u8]) -> Result<PeerIdentity, SharedError> {
    let (_, certificate) = X509Certificate::from_der(der).map_err(|error| {
        SharedError::Certificate(format!("cannot parse the certificate: {error}"))
    })?;
    let subject = certificate.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|name| name.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut named: Vec<(Kind, String)> = Vec::new();
    if let Ok(Some(sans)) = certificate.subject_alternative_name() {
        for san in &sans.value.general_names {
            if let GeneralName::URI(uri) = san
                && let Some(rest) = uri.strip_prefix(URI_SCHEME)
            {
                named.push(parse_uri_rest(uri, rest)?);
            }
        }
    }
    if named.len() > 1 {
        return Err(SharedError::Certificate(format!(
            "the certificate of {common_name:?} names {} rewind identities; it must name one",
            named.len()
        )));
    }
    let (kind, name) = match named.pop() {
        Some((kind, name)) => (Some(kind), name),
        None if common_name.is_empty() => {
            return Err(SharedError::Certificate(
                "the certificate has neither a rewind:// URI nor a common name".into(),
            ));
        }
        None => (None, common_name.clone()),
    };
    let groups = groups(&certificate)?;
    Ok(PeerIdentity {
        kind,
        name,
        common_name,
        groups,
        not_before_s: certificate.validity().not_before.timestamp(),
        not_after_s: certificate.validity().not_after.timestamp(),
    })
}

pub(crate) fn parse_uri_rest(uri: &str, rest: &str) -> Result<(Kind, String), SharedError> {
    let (kind, name) = rest.split_once('/').ok_or_else(|| {
        SharedError::Certificate(format!("URI {uri:?} must be rewind://<kind>/<name>"))
    })?;
    let kind = Kind::parse(kind)?;
    validate_name("certificate name", name)
        .map_err(|error| SharedError::Certificate(format!("URI {uri:?}: {error}")))?;
    if kind == Kind::Member && name.parse::<u64>().map_or(true, |id| id == 0) {
        return Err(SharedError::Certificate(format!(
            "URI {uri:?}: a member is named by its member id, a number above 0"
        )));
    }
    Ok((kind, name.to_string()))
}

fn groups(certificate: &X509Certificate<'_>) -> Result<Vec<String>, SharedError> {
    let subject = certificate.subject();
    let values = subject
        .iter_organization()
        .chain(subject.iter_organizational_unit());
    let mut groups = Vec::new();
    for value in values {
        let group = value.as_str().map_err(|_| {
            SharedError::Certificate("a subject O or OU is not a UTF-8 string".into())
        })?;
        validate_group(group)?;
        if groups.len() == MAX_GROUPS {
            return Err(SharedError::Certificate(format!(
                "the subject has more than {MAX_GROUPS} O and OU values"
            )));
        }
        groups.push(group.to_string());
    }
    Ok(groups)
}

/// Group names: printable ASCII letters, digits, space, `-`, `_`, `.`, at most 64 bytes.
pub fn validate_group(group: &str) -> Result<(), SharedError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.');
    if group.is_empty() || group.len() > MAX_GROUP_LEN || !group.chars().all(allowed) {
        return Err(SharedError::Certificate(format!(
            "group {:?} must be 1 to {MAX_GROUP_LEN} letters, digits, spaces, '-', '_' or '.'",
            crate::names::truncate(group, MAX_GROUP_LEN)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_ca::DevCa;
    use crate::pki::Subject;
    use rustls::pki_types::pem::PemObject;

    fn identity_of(subject: &Subject) -> Result<PeerIdentity, SharedError> {
        let ca = DevCa::generate("test CA").unwrap();
        let (pem, _) = ca.issue(subject, &[]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        peer_identity(&[der])
    }

    #[test]
    fn the_kind_and_name_come_from_the_uri() {
        let identity = identity_of(&Subject::new(Kind::Agent, "web-1")).unwrap();
        assert_eq!(identity.kind, Some(Kind::Agent));
        assert_eq!(identity.name, "web-1");
        assert_eq!(identity.principal(), "agent:web-1");
        let member = identity_of(&Subject::new(Kind::Member, "2").with_common_name("m2")).unwrap();
        assert_eq!(
            (member.kind, member.name.as_str()),
            (Some(Kind::Member), "2")
        );
        assert_eq!(member.common_name, "m2");
    }

    #[test]
    fn groups_are_the_subjects_o_and_ou() {
        let subject = Subject::new(Kind::User, "alice").with_groups(&["Example Corp", "sre"]);
        let identity = identity_of(&subject).unwrap();
        assert_eq!(identity.groups, ["Example Corp", "sre"]);
    }

    #[test]
    fn a_certificate_without_a_uri_has_no_kind() {
        let identity = identity_of(&Subject::legacy("web-1")).unwrap();
        assert_eq!(identity.kind, None);
        assert_eq!(identity.principal(), "legacy:web-1");
    }

    #[test]
    fn a_member_must_be_named_by_a_number() {
        let error = identity_of(&Subject::new(Kind::Member, "leader")).unwrap_err();
        assert!(error.to_string().contains("member id"), "{error}");
    }
}
