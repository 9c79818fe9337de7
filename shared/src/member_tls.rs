//! Dialling a coordinator member: TLS that accepts only a member's certificate.
//!
//! The usual check (the certificate chains to the cluster's CA and names the host dialled) is
//! not enough where every host holds a certificate of that CA: a stolen agent key could serve
//! as a coordinator. This verifier also requires the certificate to name kind `member`
//! (`rewind://member/<id>`), and checks the host actually dialled, so an agent redirected to
//! another member verifies that member, not one fixed server name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::SharedError;
use crate::identity::{Kind, certificate_identity};
use crate::tls::TlsFiles;

/// Accepts a server certificate only if WebPKI accepts it and it names a member.
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// Also accept a certificate without a kind (issued before kinds), for one release.
    accept_legacy: bool,
    /// Accept only this member's certificate (adding a member checks it is who it claims).
    expected_member: Option<u64>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = certificate_identity(end_entity.as_ref())
            .map_err(|error| rustls::Error::General(error.to_string()))?;
        match identity.kind {
            Some(Kind::Member)
                if self
                    .expected_member
                    .is_some_and(|id| identity.name != id.to_string()) =>
            {
                Err(rustls::Error::General(format!(
                    "the server presents {}'s certificate, not member {}'s",
                    identity.principal(),
                    self.expected_member.unwrap_or_default()
                )))
            }
            Some(Kind::Member) => Ok(ServerCertVerified::assertion()),
            None if self.accept_legacy => {
                tracing::warn!(
                    common_name = identity.name,
                    "A coordinator presented a certificate without a rewind:// identity; accepted by the compatibility switch."
                );
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General(format!(
                "the server presents {}'s certificate, not a coordinator member's",
                identity.principal()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Connects to coordinator members over TCP and TLS, for `Endpoint::connect_with_connector`
/// (the endpoint's URI is `http://host:port`: TLS is done here). The TLS files are read again
/// for a connection made after they changed, so a renewed certificate is used without a
/// restart.
#[derive(Clone)]
pub struct MemberConnector {
    settings: Arc<Settings>,
    config: Arc<std::sync::Mutex<Loaded>>,
    /// The name every member's certificate must carry instead of the host dialled (an older
    /// setting); `None`: the host dialled.
    server_name: Option<Arc<str>>,
}

struct Settings {
    ca: std::path::PathBuf,
    /// `None`: present no certificate (a host joining the cluster has none yet).
    identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    accept_legacy: bool,
    expected_member: Option<u64>,
}

struct Loaded {
    config: Arc<rustls::ClientConfig>,
    stamp: Vec<Option<std::time::SystemTime>>,
    /// The files as last found unloadable, to warn once per change.
    failed: Option<Vec<Option<std::time::SystemTime>>>,
}

impl MemberConnector {
    /// Trusts `files.ca`, presents `files.cert`; accepts only member certificates (and, with
    /// `accept_legacy`, certificates without a kind).
    pub fn new(files: &TlsFiles, accept_legacy: bool) -> Result<Self, SharedError> {
        Self::build(Settings {
            ca: files.ca.clone(),
            identity: Some((files.cert.clone(), files.key.clone())),
            accept_legacy,
            expected_member: None,
        })
    }

    /// Like [`Self::new`], accepting only member `id`'s certificate.
    pub fn expecting_member(files: &TlsFiles, id: u64) -> Result<Self, SharedError> {
        Self::for_member(files, id, false)
    }

    /// Like [`Self::expecting_member`], also accepting a certificate without a kind when
    /// `accept_legacy` (the compatibility switch).
    pub fn for_member(files: &TlsFiles, id: u64, accept_legacy: bool) -> Result<Self, SharedError> {
        Self::build(Settings {
            ca: files.ca.clone(),
            identity: Some((files.cert.clone(), files.key.clone())),
            accept_legacy,
            expected_member: Some(id),
        })
    }

    /// Trusts the CA in `ca` and presents no certificate: for joining, which is how a host gets
    /// its first one.
    pub fn anonymous(ca: &std::path::Path) -> Result<Self, SharedError> {
        Self::build(Settings {
            ca: ca.to_path_buf(),
            identity: None,
            accept_legacy: false,
            expected_member: None,
        })
    }

    fn build(settings: Settings) -> Result<Self, SharedError> {
        let loaded = settings.load()?;
        Ok(Self {
            settings: Arc::new(settings),
            config: Arc::new(std::sync::Mutex::new(loaded)),
            server_name: None,
        })
    }

    /// Requires `name` in every member's certificate instead of the host dialled.
    pub fn with_server_name(mut self, name: Option<&str>) -> Self {
        self.server_name = name.map(Arc::from);
        self
    }

    /// The TLS settings for the next connection: read again if the files changed since; the
    /// last good ones if they cannot be read now (a renewal half written, say).
    fn current(&self) -> Arc<rustls::ClientConfig> {
        let mut loaded = self
            .config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stamp = self.settings.stamp();
        if stamp != loaded.stamp && loaded.failed.as_ref() != Some(&stamp) {
            match self.settings.load() {
                Ok(fresh) => {
                    tracing::info!(certificate = ?self.settings.identity.as_ref().map(|(cert, _)| cert), "TLS files changed; connecting with them from now on.");
                    *loaded = fresh;
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but cannot be loaded; keeping the ones loaded before.");
                    loaded.failed = Some(stamp);
                }
            }
        }
        Arc::clone(&loaded.config)
    }
}

impl Settings {
    fn paths(&self) -> Vec<&std::path::Path> {
        let mut paths = vec![self.ca.as_path()];
        if let Some((cert, key)) = &self.identity {
            paths.extend([cert.as_path(), key.as_path()]);
        }
        paths
    }

    /// When each file was last changed, to notice a renewal.
    fn stamp(&self) -> Vec<Option<std::time::SystemTime>> {
        self.paths()
            .into_iter()
            .map(|path| {
                std::fs::metadata(path)
                    .and_then(|meta| meta.modified())
                    .ok()
            })
            .collect()
    }

    fn load(&self) -> Result<Loaded, SharedError> {
        let stamp = self.stamp();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for certificate in pem_certificates(&self.ca)? {
            roots.add(certificate).map_err(|error| {
                SharedError::Certificate(format!("{}: {error}", self.ca.display()))
            })?;
        }
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|error| SharedError::Certificate(format!("the CA bundle: {error}")))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| SharedError::Certificate(error.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberVerifier {
                inner,
                accept_legacy: self.accept_legacy,
                expected_member: self.expected_member,
            }));
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let private_key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
                    SharedError::Certificate(format!("{}: {error}", key.display()))
                })?;
                builder
                    .with_client_auth_cert(pem_certificates(cert)?, private_key)
                    .map_err(|error| {
                        SharedError::Certificate(format!("{}: {error}", cert.display()))
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Loaded {
            config: Arc::new(config),
            stamp,
            failed: None,
        })
    }
}

pub fn pem_certificates(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, SharedError> {
    let certificates: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|error| SharedError::Certificate(format!("{}: {error}", path.display())))?
        .collect();
    let certificates = certificates
        .map_err(|error| SharedError::Certificate(format!("{}: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(SharedError::Certificate(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for MemberConnector {
    type Response = Connected;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, BoxError>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.current();
        let fixed_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| format!("{uri} names no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| format!("{uri} names no port"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let server_name =
                ServerName::try_from(fixed_name.map_or(host, |name| name.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_ca::{DevCa, Subject};

    /// A TLS server on loopback presenting `subject`'s certificate; returns its port.
    async fn serve_as(ca: &DevCa, dir: &std::path::Path, subject: &Subject) -> u16 {
        let files = ca.write_identity(dir, subject, &["127.0.0.1"]).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pem_certificates(&files.cert).unwrap(),
            PrivateKeyDer::from_pem_file(&files.key).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn only_a_member_certificate_for_the_host_dialled_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        ca.save(dir.path()).unwrap();
        let agent = ca
            .write_identity(dir.path(), &Subject::new(Kind::Agent, "web-1"), &[])
            .unwrap();
        let mut connector = MemberConnector::new(&agent, false).unwrap();
        let connect = |connector: &mut MemberConnector, port: u16| {
            let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
            tower::Service::call(connector, uri)
        };

        let member = serve_as(&ca, dir.path(), &Subject::member(2, "coordinator-2")).await;
        connect(&mut connector, member)
            .await
            .expect("a member is accepted");

        let impostor = serve_as(&ca, dir.path(), &Subject::new(Kind::Agent, "web-9")).await;
        let error = connect(&mut connector, impostor).await.err().unwrap();
        assert!(
            error
                .to_string()
                .contains("agent:web-9's certificate, not a coordinator member's"),
            "{error}"
        );

        let legacy = serve_as(&ca, dir.path(), &Subject::legacy("coordinator")).await;
        assert!(connect(&mut connector, legacy).await.is_err());
        let mut lenient = MemberConnector::new(&agent, true).unwrap();
        connect(&mut lenient, legacy)
            .await
            .expect("the switch accepts it");
    }
}
