//! Certificates the cluster issues itself, and how long they live.
//!
//! A host or a person makes its own key and a certificate signing request (CSR) naming the
//! identity it asks for (`rewind://agent/web-1`); a coordinator member signs it with the
//! cluster's *issuing CA*, an intermediate of the cluster's root CA whose key lives only on the
//! members. The holder presents its leaf followed by the issuing CA's certificate; everyone
//! trusts the root, whose key can stay offline. What a CSR asks for is only a wish: the signer
//! decides the name, groups and lifetime ([`Grant`]) and takes nothing else from the request
//! but its public key.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::SharedError;
use crate::identity::Kind;
use crate::tls::TlsFiles;

pub const DAY_S: u64 = 86_400;
/// Shortest lifetime the cluster issues (tests use it to watch a renewal happen).
pub const MIN_LIFETIME_S: u64 = 30;
/// Longest lifetime of an agent's, a person's or an automation's certificate.
pub const MAX_LIFETIME_S: u64 = 90 * DAY_S;
/// Longest lifetime of a member's certificate.
pub const MAX_MEMBER_LIFETIME_S: u64 = 400 * DAY_S;
/// Largest CSR accepted, PEM.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Most DNS names and addresses a member's CSR may ask for.
pub const MAX_CSR_SANS: usize = 8;
/// Longest DNS name in a CSR.
const MAX_DNS_NAME_LEN: usize = 253;
/// Certificates are dated this far back, so a holder whose clock is a little behind accepts them.
pub const BACKDATE_S: i64 = 300;

/// How long the certificates the cluster issues are valid, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub agent_s: u64,
    pub user_s: u64,
    pub automation_s: u64,
    pub member_s: u64,
}

impl Default for Lifetimes {
    /// Agents and automation two weeks, people one, members 90 days.
    fn default() -> Self {
        Self {
            agent_s: 14 * DAY_S,
            user_s: 7 * DAY_S,
            automation_s: 14 * DAY_S,
            member_s: 90 * DAY_S,
        }
    }
}

impl Lifetimes {
    pub fn of(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Agent => self.agent_s,
            Kind::User => self.user_s,
            Kind::Automation => self.automation_s,
            Kind::Member => self.member_s,
        }
    }

    /// Every lifetime within its bounds, or what is not, naming the kind.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let problems: Vec<String> = Kind::ALL
            .into_iter()
            .filter_map(|kind| {
                let max = max_lifetime_s(kind);
                let lifetime = self.of(kind);
                (!(MIN_LIFETIME_S..=max).contains(&lifetime)).then(|| {
                    format!(
                        "issuer.{kind}-lifetime: is {lifetime} s; it must be {MIN_LIFETIME_S} s to {} days",
                        max / DAY_S
                    )
                })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

pub fn max_lifetime_s(kind: Kind) -> u64 {
    if kind == Kind::Member {
        MAX_MEMBER_LIFETIME_S
    } else {
        MAX_LIFETIME_S
    }
}

/// Whether a certificate valid from `not_before_s` to `not_after_s` should be renewed at
/// `now_s`: when less than a third of its life is left. Life counts from when it was issued:
/// a certificate long enough to have been back-dated ([`BACKDATE_S`]) is counted from
/// `not_before_s + BACKDATE_S`, or a short one would always look due.
pub fn renewal_due(not_before_s: i64, not_after_s: i64, now_s: i64) -> bool {
    let issued = if not_after_s - not_before_s > BACKDATE_S {
        not_before_s + BACKDATE_S
    } else {
        not_before_s
    };
    let total = (not_after_s - issued).max(1);
    (not_after_s - now_s) * 3 < total
}

/// Whom a certificate names: a kind and name (its `rewind://` URI), a common name (also its file
/// name in a PKI directory) and up to two groups (its O and OU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// `None`: a certificate as issued before kinds existed, with a common name only.
    pub kind: Option<Kind>,
    pub name: String,
    pub common_name: String,
    pub groups: Vec<String>,
}

impl Subject {
    /// `kind` named `name`, with `name` as its common name.
    pub fn new(kind: Kind, name: &str) -> Self {
        Self {
            kind: Some(kind),
            name: name.to_string(),
            common_name: name.to_string(),
            groups: Vec::new(),
        }
    }

    /// Coordinator member `id`, whose certificate (and files) are called `common_name`.
    pub fn member(id: u64, common_name: &str) -> Self {
        Self::new(Kind::Member, &id.to_string()).with_common_name(common_name)
    }

    /// A certificate without kind, as issued before kinds existed.
    pub fn legacy(common_name: &str) -> Self {
        Self {
            kind: None,
            name: common_name.to_string(),
            common_name: common_name.to_string(),
            groups: Vec::new(),
        }
    }

    pub fn with_common_name(mut self, common_name: &str) -> Self {
        self.common_name = common_name.to_string();
        self
    }

    pub fn with_groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|group| group.to_string()).collect();
        self
    }

    /// How long the cluster issues this subject's certificates for by default.
    pub fn default_lifetime_s(&self) -> u64 {
        Lifetimes::default().of(self.kind.unwrap_or(Kind::User))
    }
}

/// The parameters of a leaf certificate for `subject`, valid from `now_s` (back-dated a little)
/// for `lifetime_s`, for the DNS names and addresses in `sans`, as server and client.
pub fn leaf_params(
    subject: &Subject,
    sans: &[String],
    now_s: i64,
    lifetime_s: u64,
) -> Result<CertificateParams, SharedError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
    for san in sans {
        params.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(address) => SanType::IpAddress(address),
            Err(_) => SanType::DnsName(san.clone().try_into().map_err(|_| {
                SharedError::Certificate(format!("{san:?} is not an ASCII DNS name"))
            })?),
        });
    }
    if let Some(kind) = subject.kind {
        let uri = kind.uri(&subject.name);
        let uri = uri
            .clone()
            .try_into()
            .map_err(|_| SharedError::Certificate(format!("{uri:?} is not an ASCII URI")))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, subject.common_name.as_str());
    // rcgen holds one value per attribute, so at most two groups are written.
    if subject.groups.len() > 2 {
        return Err(SharedError::Certificate(format!(
            "a certificate carries at most two groups (as O and OU), not {}",
            subject.groups.len()
        )));
    }
    for (group, attribute) in subject
        .groups
        .iter()
        .zip([DnType::OrganizationName, DnType::OrganizationalUnitName])
    {
        crate::identity::validate_group(group)?;
        name.push(attribute, group.as_str());
    }
    params.distinguished_name = name;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, now_s, lifetime_s)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    Ok(params)
}

/// Valid from a little before `now_s` for `lifetime_s`.
pub fn set_validity(
    params: &mut CertificateParams,
    now_s: i64,
    lifetime_s: u64,
) -> Result<(), SharedError> {
    let at = |seconds: i64| {
        OffsetDateTime::from_unix_timestamp(seconds)
            .map_err(|error| SharedError::Certificate(format!("certificate validity: {error}")))
    };
    let lifetime = i64::try_from(lifetime_s)
        .map_err(|_| SharedError::Certificate(format!("lifetime {lifetime_s} s is too long")))?;
    params.not_before = at(now_s - BACKDATE_S)?;
    params.not_after = at(now_s.saturating_add(lifetime))?;
    Ok(())
}

/// 16 random bytes with the top bit clear (a positive serial, as RFC 5280 asks).
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .expect("the system random source works");
    serial[0] &= 0x7f;
    serial
}

/// What a CSR asks for: one identity and, for a member, the names it serves as.
#[derive(Debug)]
pub struct CsrRequest {
    pub kind: Kind,
    pub name: String,
    /// DNS names and addresses (members only).
    pub sans: Vec<String>,
    parsed: CertificateSigningRequestParams,
}

impl CsrRequest {
    /// sha256 of the public key asked to be certified, hex: the same key asking again is the
    /// same request.
    pub fn key_sha256(&self) -> String {
        use rcgen::PublicKeyData;
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.parsed.public_key.der_bytes()))
    }
}

/// Reads a PEM CSR, checks it is signed by the key it carries, and what identity it asks for:
/// exactly one `rewind://` URI, and DNS names or addresses only for a member.
pub fn read_csr(pem: &str) -> Result<CsrRequest, SharedError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(SharedError::Certificate(format!(
            "the CSR is {} bytes, at most {MAX_CSR_BYTES}",
            pem.len()
        )));
    }
    let parsed = CertificateSigningRequestParams::from_pem(pem).map_err(|error| {
        SharedError::Certificate(format!(
            "the CSR is not a valid, self-signed PKCS#10 request: {error}"
        ))
    })?;
    let mut identities = Vec::new();
    let mut sans = Vec::new();
    for san in &parsed.params.subject_alt_names {
        match san {
            SanType::URI(uri) => {
                let uri = uri.as_str();
                let rest = uri
                    .strip_prefix(crate::identity::URI_SCHEME)
                    .ok_or_else(|| {
                        SharedError::Certificate(format!(
                            "the CSR names URI {:?}; only rewind://<kind>/<name> is issued",
                            crate::names::truncate(uri, 128)
                        ))
                    })?;
                identities.push(crate::identity::parse_uri_rest(uri, rest)?);
            }
            SanType::DnsName(name) => {
                let name = name.as_str();
                let valid = !name.is_empty()
                    && name.len() <= MAX_DNS_NAME_LEN
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
                if !valid {
                    return Err(SharedError::Certificate(format!(
                        "the CSR's DNS name {:?} is not a host name",
                        crate::names::truncate(name, 64)
                    )));
                }
                sans.push(name.to_string());
            }
            SanType::IpAddress(address) => sans.push(address.to_string()),
            other => {
                let shown = format!("{other:?}");
                return Err(SharedError::Certificate(format!(
                    "the CSR asks for a name of a kind rewind does not issue ({})",
                    crate::names::printable(&shown, 96)
                )));
            }
        }
    }
    let (kind, name) = match identities.len() {
        1 => identities.remove(0),
        count => {
            return Err(SharedError::Certificate(format!(
                "the CSR names {count} rewind:// identities; it must name exactly one"
            )));
        }
    };
    if !sans.is_empty() && kind != Kind::Member {
        return Err(SharedError::Certificate(format!(
            "the CSR asks for DNS names or addresses; only a member's certificate carries them, not {kind}'s"
        )));
    }
    if sans.len() > MAX_CSR_SANS {
        return Err(SharedError::Certificate(format!(
            "the CSR asks for {} DNS names and addresses, at most {MAX_CSR_SANS}",
            sans.len()
        )));
    }
    Ok(CsrRequest {
        kind,
        name,
        sans,
        parsed,
    })
}

/// A new key and a CSR asking for `subject` (and, for a member, `sans`). Returns (CSR PEM, key
/// PEM); the key never leaves the caller.
pub fn make_csr(subject: &Subject, sans: &[String]) -> Result<(String, String), SharedError> {
    let key = KeyPair::generate().map_err(certificate_error)?;
    let mut params = leaf_params(subject, sans, crate::time::now_s(), MIN_LIFETIME_S)?;
    // The signer picks the serial (and the validity, which a CSR cannot carry).
    params.serial_number = None;
    let csr = params.serialize_request(&key).map_err(certificate_error)?;
    Ok((csr.pem().map_err(certificate_error)?, key.serialize_pem()))
}

/// What the signer grants a CSR: the identity in full, and for how long.
#[derive(Clone, Debug)]
pub struct Grant {
    pub subject: Subject,
    pub sans: Vec<String>,
    pub lifetime_s: u64,
}

/// A certificate the cluster issued: the leaf then the issuing CA's certificate, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub chain_pem: String,
    pub not_after_s: i64,
}

/// The cluster's issuing CA, as the members hold it.
pub struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// No certificate it issues outlives it.
    not_after_s: i64,
}

impl IssuingCa {
    /// Loads the issuing CA's certificate and key: the certificate must be a CA's, valid now,
    /// and for this key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, SharedError> {
        let cert_pem = read_string(cert)?;
        let key = KeyPair::from_pem(&read_string(key)?)
            .map_err(|error| SharedError::Certificate(format!("{}: {error}", key.display())))?;
        Self::from_parts_checked(&cert_pem, key)
            .map_err(|error| SharedError::Certificate(format!("{}: {error}", cert.display())))
    }

    pub(crate) fn from_parts_checked(cert_pem: &str, key: KeyPair) -> Result<Self, String> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        use x509_parser::prelude::{FromDer, X509Certificate};
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|error| error.to_string())?;
        let (_, certificate) =
            X509Certificate::from_der(der.as_ref()).map_err(|error| error.to_string())?;
        if !certificate.is_ca() {
            return Err("is not a CA certificate (basic constraints CA:TRUE)".into());
        }
        if certificate.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err("is not the certificate of the key given beside it".into());
        }
        let now = crate::time::now_s();
        let validity = certificate.validity();
        if validity.not_after.timestamp() <= now || validity.not_before.timestamp() > now {
            return Err(format!(
                "is not valid now (valid from {} to {}, unix seconds)",
                validity.not_before.timestamp(),
                validity.not_after.timestamp()
            ));
        }
        let not_after_s = validity.not_after.timestamp();
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|error| error.to_string())?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            not_after_s,
        })
    }

    /// Signs `request`'s public key for what `grant` says, nothing the request itself asked.
    pub fn sign(
        &self,
        request: &CsrRequest,
        grant: &Grant,
        now_s: i64,
    ) -> Result<Issued, SharedError> {
        let lifetime_s = grant
            .lifetime_s
            .min(u64::try_from(self.not_after_s - now_s).unwrap_or(0));
        if lifetime_s < MIN_LIFETIME_S {
            return Err(SharedError::Certificate(format!(
                "the issuing CA expires at {} (unix seconds): renew it",
                self.not_after_s
            )));
        }
        let params = leaf_params(&grant.subject, &grant.sans, now_s, lifetime_s)?;
        let not_after_s = params.not_after.unix_timestamp();
        let signing = CertificateSigningRequestParams {
            params,
            public_key: request.parsed.public_key.clone(),
        };
        let certificate = signing.signed_by(&self.issuer).map_err(certificate_error)?;
        Ok(Issued {
            chain_pem: format!("{}{}", certificate.pem(), self.cert_pem),
            not_after_s,
        })
    }
}

/// Writes a certificate chain and its key where `files` says, each whole then renamed, so a
/// reader (the coordinator's reloader, the next connection) never sees half of one. The key is
/// written first: a new key with the old certificate is refused and retried by readers, never
/// served.
pub fn install(files: &TlsFiles, chain_pem: &str, key_pem: &str) -> Result<(), SharedError> {
    check_pair(chain_pem, key_pem)?;
    write_replacing(&files.key, key_pem, 0o600)?;
    write_replacing(&files.cert, chain_pem, 0o644)
}

/// The chain's leaf is for this key (a certificate issued for another key is never installed
/// over a working pair).
pub fn check_pair(chain_pem: &str, key_pem: &str) -> Result<(), SharedError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| SharedError::Certificate(format!("the certificate chain: {error}")))?;
    if chain.is_empty() {
        return Err(SharedError::Certificate(
            "the certificate chain holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|error| SharedError::Certificate(format!("the key: {error}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map_err(|error| SharedError::Certificate(format!("the key and certificate: {error}")))?;
    certified.keys_match().map_err(|error| {
        SharedError::Certificate(format!("the certificate is not for this key ({error})"))
    })
}

/// Whether `files` hold a pair an agent or person can connect with: both there, the leaf for
/// the key, not expired. `Err` says what is wrong.
pub fn check_files(files: &TlsFiles) -> Result<(), SharedError> {
    let chain = read_string(&files.cert)?;
    let key = read_string(&files.key)?;
    check_pair(&chain, &key)?;
    let leaf = crate::member_tls::pem_certificates(&files.cert)?;
    let identity = crate::identity::certificate_identity(leaf[0].as_ref())?;
    if identity.not_after_s <= crate::time::now_s() {
        return Err(SharedError::Certificate(format!(
            "{} expired at {} (unix seconds)",
            files.cert.display(),
            identity.not_after_s
        )));
    }
    Ok(())
}

/// Writes `contents` to a new file of its own beside `path` (created with `mode`, so a key is
/// never readable by others even for a moment), syncs it and renames it over `path`, so readers
/// see the old file or the new one, whole.
pub fn write_replacing(path: &Path, contents: &str, mode: u32) -> Result<(), SharedError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let write_error = |source| SharedError::Write {
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(write_error)?;
    let mut file = tempfile::Builder::new()
        .prefix(".rewind-")
        .suffix(".partial")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(parent)
        .map_err(write_error)?;
    // Set again on the open file: the mode asked at creation is narrowed by the umask (077 in
    // rewind's own processes), and a certificate must stay readable by others.
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.as_file().sync_all().map_err(write_error)?;
    file.persist(path)
        .map_err(|error| write_error(error.error))?;
    if let Ok(directory) = std::fs::File::open(parent) {
        let _ = directory.sync_all();
    }
    Ok(())
}

pub(crate) fn certificate_error(error: rcgen::Error) -> SharedError {
    SharedError::Certificate(error.to_string())
}

pub(crate) fn read_string(path: &Path) -> Result<String, SharedError> {
    std::fs::read_to_string(path).map_err(|source| SharedError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_ca::DevCa;
    use crate::identity::certificate_identity;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn a_signed_csr_carries_the_grant_not_the_wish() {
        let root = DevCa::generate("test root").unwrap();
        let issuing = root.issuing_ca("test issuing CA").unwrap();
        let wish = Subject::new(Kind::Agent, "web-1").with_groups(&["admins"]);
        let (csr, _key) = make_csr(&wish, &[]).unwrap();
        let request = read_csr(&csr).unwrap();
        assert_eq!(
            (request.kind, request.name.as_str()),
            (Kind::Agent, "web-1")
        );
        let grant = Grant {
            subject: Subject::new(Kind::Agent, "web-1"),
            sans: Vec::new(),
            lifetime_s: 3600,
        };
        let now = crate::time::now_s();
        let issued = issuing.sign(&request, &grant, now).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "the leaf and the issuing CA");
        let identity = certificate_identity(chain[0].as_ref()).unwrap();
        assert_eq!(identity.principal(), "agent:web-1");
        assert!(identity.groups.is_empty(), "groups come from the grant");
        assert_eq!(identity.not_after_s, now + 3600);
        assert_eq!(issued.not_after_s, now + 3600);
    }

    #[test]
    fn a_csr_must_name_one_identity_and_no_host_names_unless_a_member() {
        let (legacy, _) = make_csr(&Subject::legacy("web-1"), &[]).unwrap();
        let error = read_csr(&legacy).unwrap_err().to_string();
        assert!(error.contains("exactly one"), "{error}");
        let (agent, _) = make_csr(
            &Subject::new(Kind::Agent, "web-1"),
            &["evil.example".into()],
        )
        .unwrap();
        let error = read_csr(&agent).unwrap_err().to_string();
        assert!(error.contains("only a member's"), "{error}");
        let (member, _) = make_csr(
            &Subject::member(2, "coordinator-2"),
            &["coordinator-2".into(), "10.0.0.2".into()],
        )
        .unwrap();
        assert_eq!(
            read_csr(&member).unwrap().sans,
            ["coordinator-2", "10.0.0.2"]
        );
        let error = read_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("PKCS#10"), "{error}");
        assert!(read_csr(&"x".repeat(MAX_CSR_BYTES + 1)).is_err());
    }

    #[test]
    fn renewal_is_due_in_the_last_third_of_the_life_since_issue() {
        assert!(!renewal_due(0, 300, 150));
        assert!(!renewal_due(0, 300, 199));
        assert!(renewal_due(0, 300, 201));
        assert!(renewal_due(0, 300, 400));
        // Issued at 1000 for 45 s, back-dated 300 s: due after 30 s, not at once.
        let (not_before, not_after) = (1000 - BACKDATE_S, 1045);
        assert!(!renewal_due(not_before, not_after, 1001));
        assert!(!renewal_due(not_before, not_after, 1029));
        assert!(renewal_due(not_before, not_after, 1031));
    }
}
