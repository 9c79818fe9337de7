//! A throw-away certificate authority for `rewind-coordinator --dev`, the demo and the tests.
//!
//! Never for production: the CA key sits in the data dir next to everything it signs.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::SharedError;
use crate::identity::Kind;
use crate::pki::{DAY_S, IssuingCa, certificate_error, leaf_params, read_string, set_validity};
use crate::tls::TlsFiles;

/// Names of the issuing CA's files in a dev PKI directory (the members sign joins with it).
pub const ISSUER: &str = "issuer";
/// How long the dev root CA is valid.
const ROOT_LIFETIME_S: u64 = 10 * 365 * DAY_S;
/// How long the dev issuing CA is valid.
const ISSUING_LIFETIME_S: u64 = 5 * 365 * DAY_S;

/// Name of the coordinator's server certificate in a dev PKI directory.
pub const COORDINATOR: &str = "coordinator";
/// Name of the operator (rewindctl) client certificate in a dev PKI directory.
pub const OPERATOR: &str = "operator";

pub use crate::pki::Subject;

pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl DevCa {
    pub fn generate(common_name: &str) -> Result<Self, SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let params = ca_params(
            common_name,
            BasicConstraints::Unconstrained,
            ROOT_LIFETIME_S,
        )?;
        let cert_pem = params.self_signed(&key).map_err(certificate_error)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// An issuing CA under this root (it may sign leaves only), as the members hold it.
    pub fn issuing_ca(&self, common_name: &str) -> Result<IssuingCa, SharedError> {
        let (cert_pem, key) = self.issue_issuing_ca(common_name)?;
        IssuingCa::from_parts_checked(&cert_pem, key).map_err(SharedError::Certificate)
    }

    fn issue_issuing_ca(&self, common_name: &str) -> Result<(String, KeyPair), SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let params = ca_params(
            common_name,
            BasicConstraints::Constrained(0),
            ISSUING_LIFETIME_S,
        )?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(certificate_error)?;
        Ok((certificate.pem(), key))
    }

    /// Writes an issuing CA under this root as `<dir>/issuer.pem` and `.key` (mode 0600).
    pub fn write_issuing_ca(&self, dir: &Path) -> Result<TlsFiles, SharedError> {
        let (cert_pem, key) = self.issue_issuing_ca("rewind issuing CA")?;
        let files = TlsFiles::in_dir(dir, ISSUER);
        write(&files.key, &key.serialize_pem(), 0o600)?;
        write(&files.cert, &cert_pem, 0o644)?;
        Ok(files)
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
    /// given DNS names and IP addresses for the subject kind's default lifetime. Returns
    /// (certificate PEM, key PEM).
    pub fn issue(
        &self,
        subject: &Subject,
        subject_alt_names: &[&str],
    ) -> Result<(String, String), SharedError> {
        self.issue_for(subject, subject_alt_names, subject.default_lifetime_s())
    }

    /// [`Self::issue`] valid for `lifetime_s`.
    pub fn issue_for(
        &self,
        subject: &Subject,
        subject_alt_names: &[&str],
        lifetime_s: u64,
    ) -> Result<(String, String), SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let sans: Vec<String> = subject_alt_names
            .iter()
            .map(|san| san.to_string())
            .collect();
        let params = leaf_params(subject, &sans, crate::time::now_s(), lifetime_s)?;
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
        self.write_identity_for(
            dir,
            subject,
            subject_alt_names,
            subject.default_lifetime_s(),
        )
    }

    /// [`Self::write_identity`] valid for `lifetime_s`.
    pub fn write_identity_for(
        &self,
        dir: &Path,
        subject: &Subject,
        subject_alt_names: &[&str],
        lifetime_s: u64,
    ) -> Result<TlsFiles, SharedError> {
        let (cert, key) = self.issue_for(subject, subject_alt_names, lifetime_s)?;
        let files = TlsFiles::in_dir(dir, &subject.common_name);
        write(&files.cert, &cert, 0o644)?;
        write(&files.key, &key, 0o600)?;
        if !files.ca.exists() {
            write(&files.ca, &self.cert_pem, 0o644)?;
        }
        Ok(files)
    }
}

/// Creates (once) a dev PKI in `dir`: a CA, its issuing CA (`issuer.pem`, which signs joins),
/// the coordinator's certificate (member 1) for `localhost`/`127.0.0.1`, and the `operator`
/// user's client certificate. Existing files are kept, so a restarted dev coordinator keeps its
/// identity; the two certificates are re-issued once a third of their life is left, so a dev
/// data dir does not stop working when they expire.
pub fn ensure_dev_pki(dir: &Path) -> Result<DevCa, SharedError> {
    std::fs::create_dir_all(dir).map_err(|source| SharedError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        DevCa::load(dir)?
    } else {
        let ca = DevCa::generate("rewind dev CA")?;
        ca.save(dir)?;
        ca
    };
    if !TlsFiles::in_dir(dir, ISSUER).cert.exists() {
        ca.write_issuing_ca(dir)?;
    }
    let own: [(Subject, &[&str]); 2] = [
        (Subject::member(1, COORDINATOR), &["localhost", "127.0.0.1"]),
        (Subject::new(Kind::User, OPERATOR), &[]),
    ];
    for (subject, sans) in own {
        let files = TlsFiles::in_dir(dir, &subject.common_name);
        if crate::enroll::renewal_due(&files).0 {
            ca.write_identity(dir, &subject, sans)?;
        }
    }
    Ok(ca)
}

fn ca_params(
    common_name: &str,
    constraints: BasicConstraints,
    lifetime_s: u64,
) -> Result<CertificateParams, SharedError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, crate::time::now_s(), lifetime_s)?;
    Ok(params)
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), SharedError> {
    crate::pki::write_replacing(path, contents, mode)
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
