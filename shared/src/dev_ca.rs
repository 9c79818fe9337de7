//! A throw-away certificate authority for `rewind-coordinator --dev`, the demo and the tests.
//!
//! Never for production: the CA key sits in the data dir next to everything it signs.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::SharedError;
use crate::identity::Kind;
use crate::tls::TlsFiles;

/// Name of the coordinator's server certificate in a dev PKI directory.
pub const COORDINATOR: &str = "coordinator";
/// Name of the operator (rewindctl) client certificate in a dev PKI directory.
pub const OPERATOR: &str = "operator";

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
}

pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl DevCa {
    pub fn generate(common_name: &str) -> Result<Self, SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert_pem = params.self_signed(&key).map_err(certificate_error)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, SharedError> {
        let cert_pem = read_string(&dir.join("ca.pem"))?;
        let key =
            KeyPair::from_pem(&read_string(&dir.join("ca.key"))?).map_err(certificate_error)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(certificate_error)?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), SharedError> {
        write(&dir.join("ca.pem"), &self.cert_pem, 0o644)?;
        write(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            0o600,
        )
    }

    /// Issues a leaf certificate for `subject`, usable as server and client, valid for the
    /// given DNS names and IP addresses. Returns (certificate PEM, key PEM).
    pub fn issue(
        &self,
        subject: &Subject,
        subject_alt_names: &[&str],
    ) -> Result<(String, String), SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let sans = subject_alt_names
            .iter()
            .map(|san| san.to_string())
            .collect::<Vec<_>>();
        let mut params = CertificateParams::new(sans).map_err(certificate_error)?;
        if let Some(kind) = subject.kind {
            let uri = kind.uri(&subject.name);
            let uri = uri
                .clone()
                .try_into()
                .map_err(|_| SharedError::Certificate(format!("{uri:?} is not an ASCII URI")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.distinguished_name = name(&subject.common_name);
        // rcgen holds one value per attribute, so the dev CA writes two groups at most.
        if subject.groups.len() > 2 {
            return Err(SharedError::Certificate(format!(
                "the dev CA writes at most two groups (as O and OU), not {}",
                subject.groups.len()
            )));
        }
        for (group, attribute) in subject
            .groups
            .iter()
            .zip([DnType::OrganizationName, DnType::OrganizationalUnitName])
        {
            crate::identity::validate_group(group)?;
            params.distinguished_name.push(attribute, group.as_str());
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(certificate_error)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    /// Issues `subject` and writes `<dir>/<common name>.pem` and `.key`, next to `ca.pem`.
    pub fn write_identity(
        &self,
        dir: &Path,
        subject: &Subject,
        subject_alt_names: &[&str],
    ) -> Result<TlsFiles, SharedError> {
        let (cert, key) = self.issue(subject, subject_alt_names)?;
        let files = TlsFiles::in_dir(dir, &subject.common_name);
        write(&files.cert, &cert, 0o644)?;
        write(&files.key, &key, 0o600)?;
        if !files.ca.exists() {
            write(&files.ca, &self.cert_pem, 0o644)?;
        }
        Ok(files)
    }
}

/// Creates (once) a dev PKI in `dir`: a CA, the coordinator's certificate (member 1) for
/// `localhost`/`127.0.0.1`, and the `operator` user's client certificate. Existing files are kept, so a
/// restarted dev coordinator keeps its identity.
pub fn ensure_dev_pki(dir: &Path) -> Result<DevCa, SharedError> {
    std::fs::create_dir_all(dir).map_err(|source| SharedError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        return DevCa::load(dir);
    }
    let ca = DevCa::generate("rewind dev CA")?;
    ca.save(dir)?;
    ca.write_identity(
        dir,
        &Subject::member(1, COORDINATOR),
        &["localhost", "127.0.0.1"],
    )?;
    ca.write_identity(dir, &Subject::new(Kind::User, OPERATOR), &[])?;
    Ok(ca)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn certificate_error(error: rcgen::Error) -> SharedError {
    SharedError::Certificate(error.to_string())
}

fn read_string(path: &Path) -> Result<String, SharedError> {
    std::fs::read_to_string(path).map_err(|source| SharedError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), SharedError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| SharedError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(write_error)?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::peer_identity;
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn issued_certificates_carry_their_name_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        let reloaded = ensure_dev_pki(dir.path()).unwrap();
        let files = reloaded
            .write_identity(dir.path(), &Subject::new(Kind::Agent, "host-7"), &[])
            .unwrap();
        let pem = std::fs::read(&files.cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(peer_identity(&[der]).unwrap().principal(), "agent:host-7");
    }
}
