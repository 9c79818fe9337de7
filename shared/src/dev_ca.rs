//! A throw-away certificate authority for `rewind-coordinator --dev`, the demo and the tests.
//!
//! Never for production: the CA key sits in the data dir next to everything it signs.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::SharedError;
use crate::tls::TlsFiles;

/// Name of the coordinator's server certificate in a dev PKI directory.
pub const COORDINATOR: &str = "coordinator";
/// Name of the operator (rewindctl) client certificate in a dev PKI directory.
pub const OPERATOR: &str = "operator";

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

    /// Issues a leaf certificate with CN `name`, usable as server and client, valid for the
    /// given DNS names and IP addresses. Returns (certificate PEM, key PEM).
    pub fn issue(
        &self,
        name_cn: &str,
        subject_alt_names: &[&str],
    ) -> Result<(String, String), SharedError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let sans = subject_alt_names
            .iter()
            .map(|san| san.to_string())
            .collect::<Vec<_>>();
        let mut params = CertificateParams::new(sans).map_err(certificate_error)?;
        params.distinguished_name = name(name_cn);
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

    /// Issues `name` and writes `<dir>/<name>.pem` and `<dir>/<name>.key`, next to `ca.pem`.
    pub fn write_identity(
        &self,
        dir: &Path,
        name_cn: &str,
        subject_alt_names: &[&str],
    ) -> Result<TlsFiles, SharedError> {
        let (cert, key) = self.issue(name_cn, subject_alt_names)?;
        let files = TlsFiles::in_dir(dir, name_cn);
        write(&files.cert, &cert, 0o644)?;
        write(&files.key, &key, 0o600)?;
        if !files.ca.exists() {
            write(&files.ca, &self.cert_pem, 0o644)?;
        }
        Ok(files)
    }
}

/// Creates (once) a dev PKI in `dir`: a CA, the coordinator's server certificate for
/// `localhost`/`127.0.0.1`, and an `operator` client certificate. Existing files are kept, so a
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
    ca.write_identity(dir, COORDINATOR, &["localhost", "127.0.0.1"])?;
    ca.write_identity(dir, OPERATOR, &[])?;
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
    use crate::tls::identity_of;
    use rustls::pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn issued_certificates_carry_their_name_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        let reloaded = ensure_dev_pki(dir.path()).unwrap();
        let files = reloaded.write_identity(dir.path(), "host-7", &[]).unwrap();
        let pem = std::fs::read(&files.cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(identity_of(&[der]).unwrap(), "host-7");
    }
}
