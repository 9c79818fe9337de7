//! Mutual TLS for every connection: PEM files to tonic client configs (the coordinator's own
//! listener is `coordinator/src/api/listener.rs`; agents dial through [`crate::member_tls`]).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::SharedError;

/// Where a component's CA bundle, certificate and private key live.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout the dev CA writes: `<dir>/ca.pem`, `<dir>/<name>.pem`, `<dir>/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// Client side: trust only our CA, present our certificate. `domain` must be a name in the
    /// server certificate (the dev CA puts `localhost` and `127.0.0.1` there).
    pub fn client_config(&self, domain: &str) -> Result<ClientTlsConfig, SharedError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca_certificate()?)
            .identity(self.identity()?)
            .domain_name(domain))
    }

    /// [`Self::client_config`] for a server dialled at `address` (`host:port`, `[v6]:port`):
    /// its certificate must name the host.
    pub fn client_config_for_address(&self, address: &str) -> Result<ClientTlsConfig, SharedError> {
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        self.client_config(host.trim_start_matches('[').trim_end_matches(']'))
    }

    fn ca_certificate(&self) -> Result<Certificate, SharedError> {
        Ok(Certificate::from_pem(read(&self.ca)?))
    }

    fn identity(&self) -> Result<Identity, SharedError> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SharedError> {
    std::fs::read(path).map_err(|source| SharedError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Installs ring as the process-wide rustls provider. Call once at start-up: with two providers
/// compiled in, rustls refuses to pick one by itself.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which of a component's TLS files must be usable before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needed {
    /// CA, certificate and key (a coordinator; an agent without a join token).
    All,
    /// The CA only: the certificate and key come from joining with a token.
    CaOnly,
}

/// Each problem with `files` that would stop a component from serving or connecting, naming
/// the setting, the path and what is wrong with it: missing, a directory, unreadable, not PEM
/// of the right kind, a key not for the certificate, an expired certificate. Empty when usable.
pub fn check_tls_files(field: &str, files: &TlsFiles, needed: Needed) -> Vec<String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let mut problems = Vec::new();
    let mut readable = |name: &str, path: &Path| -> Option<String> {
        match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Some(text),
                Err(_) => {
                    problems.push(format!(
                        "{field}.{name}: {}: is not PEM text",
                        path.display()
                    ));
                    None
                }
            },
            Err(error) => {
                let what = match error.kind() {
                    std::io::ErrorKind::NotFound => "does not exist".to_string(),
                    std::io::ErrorKind::IsADirectory => "is a directory, not a file".to_string(),
                    _ => format!("cannot be read ({error})"),
                };
                problems.push(format!("{field}.{name}: {}: {what}", path.display()));
                None
            }
        }
    };
    let ca = readable("ca", &files.ca);
    let (cert, key) = match needed {
        Needed::All => (readable("cert", &files.cert), readable("key", &files.key)),
        Needed::CaOnly => (None, None),
    };
    let certificates = |text: &str| {
        rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .filter(|certificates| !certificates.is_empty())
    };
    if let Some(text) = &ca
        && certificates(text).is_none()
    {
        problems.push(format!(
            "{field}.ca: {}: holds no PEM certificate",
            files.ca.display()
        ));
    }
    let leaf = cert.as_deref().and_then(|text| {
        let found = certificates(text);
        if found.is_none() {
            problems.push(format!(
                "{field}.cert: {}: holds no PEM certificate",
                files.cert.display()
            ));
        }
        found
    });
    let key_ok = key.as_deref().is_some_and(|text| {
        let parsed = PrivateKeyDer::from_pem_slice(text.as_bytes()).is_ok();
        if !parsed {
            problems.push(format!(
                "{field}.key: {}: holds no PEM private key",
                files.key.display()
            ));
        }
        parsed
    });
    if let (Some(leaf), Some(cert), Some(key), true) = (leaf, &cert, &key, key_ok) {
        if let Err(error) = crate::pki::check_pair(cert, key) {
            problems.push(format!(
                "{field}.key: {}: not the key of {} ({error})",
                files.key.display(),
                files.cert.display()
            ));
        }
        match crate::identity::certificate_identity(leaf[0].as_ref()) {
            Ok(identity) if identity.not_after_s <= crate::time::now_s() => problems.push(format!(
                "{field}.cert: {}: expired at {} (unix seconds)",
                files.cert.display(),
                identity.not_after_s
            )),
            Ok(_) => {}
            Err(error) => problems.push(format!("{field}.cert: {}: {error}", files.cert.display())),
        }
    }
    problems
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn every_unusable_tls_file_is_named_with_its_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::dev_ca::ensure_dev_pki(dir.path()).unwrap();
        let good = ca
            .write_identity(
                dir.path(),
                &crate::dev_ca::Subject::new(crate::identity::Kind::Agent, "web-1"),
                &[],
            )
            .unwrap();
        assert_eq!(
            check_tls_files("tls", &good, Needed::All),
            Vec::<String>::new()
        );
        let other = ca
            .write_identity(
                dir.path(),
                &crate::dev_ca::Subject::new(crate::identity::Kind::Agent, "web-2"),
                &[],
            )
            .unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "not pem").unwrap();
        let cases = [
            (
                TlsFiles {
                    cert: dir.path().join("nope.pem"),
                    ..good.clone()
                },
                "tls.cert: ",
                "nope.pem: does not exist",
            ),
            (
                TlsFiles {
                    cert: dir.path().to_path_buf(),
                    ..good.clone()
                },
                "tls.cert: ",
                "is a directory",
            ),
            (
                TlsFiles {
                    ca: dir.path().join("garbage.pem"),
                    ..good.clone()
                },
                "tls.ca: ",
                "garbage.pem: holds no PEM certificate",
            ),
            (
                TlsFiles {
                    key: dir.path().join("garbage.pem"),
                    ..good.clone()
                },
                "tls.key: ",
                "holds no PEM private key",
            ),
            (
                TlsFiles {
                    key: other.key.clone(),
                    ..good.clone()
                },
                "tls.key: ",
                "not the key of",
            ),
        ];
        for (files, field, why) in cases {
            let problems = check_tls_files("tls", &files, Needed::All);
            assert!(
                problems
                    .iter()
                    .any(|problem| problem.starts_with(field) && problem.contains(why)),
                "{why}: {problems:?}"
            );
        }
        let joining = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
            ..good
        };
        assert!(check_tls_files("tls", &joining, Needed::CaOnly).is_empty());
    }
}
