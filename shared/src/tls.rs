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
