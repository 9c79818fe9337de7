//! Outbound HTTPS, the same for every endpoint rewind calls (escalation and incident webhooks,
//! Alertmanager, synthetic checks, the agent's probes, metrics scrapes, hooks, purges and
//! checks): `https://` through rustls, trusting the system's certificate store and Mozilla's
//! roots built in, plus the CAs of a configured bundle (`ca-file`), and presenting a client
//! certificate when one is configured (`client-cert-file` and `client-key-file`). Redirects are
//! never followed: one could carry a signed body or a credential elsewhere.
//!
//! Plain `http://` stays possible; [`plain_http_warning`] says when it carries a secret.

use std::path::{Path, PathBuf};

/// Largest CA bundle, client certificate chain or client key read.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// The TLS files of one endpoint, as configured (each optional; the client pair together): the
/// keys `ca-file`, `client-cert-file` and `client-key-file` of a config section.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct HttpsFiles {
    /// PEM certificates a server's chain may end in, besides the system's and Mozilla's.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to servers that ask for one.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// Gives config sections that write out `ca-file`, `client-cert-file` and `client-key-file`
/// beside their URL an `https_files()` reading them back as one [`HttpsFiles`] (written out
/// rather than `serde(flatten)`ed, which would hide the section's unknown keys).
#[macro_export]
macro_rules! https_files_of {
    ($($section:ty),*) => {$(
        impl $section {
            fn https_files(&self) -> $crate::outbound::HttpsFiles {
                $crate::outbound::HttpsFiles {
                    ca_file: self.ca_file.clone(),
                    client_cert_file: self.client_cert_file.clone(),
                    client_key_file: self.client_key_file.clone(),
                }
            }
        }
    )*};
}

/// What [`HttpsFiles`] hold, read and checked once: clients are built from it without touching
/// the disk again.
#[derive(Clone, Default)]
pub struct HttpsTrust {
    /// The client built from these, once (building one reads the system's store from disk),
    /// shared by every clone.
    built: std::sync::Arc<std::sync::OnceLock<reqwest::Client>>,
    /// Extra roots (PEM), checked to hold at least one certificate.
    ca_pem: Option<Vec<u8>>,
    /// The client's certificate chain and key (PEM, one after the other), checked to load.
    identity_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for HttpsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsTrust")
            .field("extra_roots", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .finish()
    }
}

impl HttpsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }

    /// Reads and checks every file. A problem is named by its key under `section`
    /// (`incidents.client-key-file: /etc/rewind/pd.key: is not a PEM private key`), as a
    /// config's problems are.
    pub fn load(&self, section: &str) -> Result<HttpsTrust, Vec<String>> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(format!("{section}.{key}: {message}"));
        };
        let mut trust = HttpsTrust::default();
        if let Some(path) = &self.ca_file {
            match read_pem(path).and_then(|pem| check_roots(path, pem)) {
                Ok(pem) => trust.ca_pem = Some(pem),
                Err(why) => problem("ca-file", why),
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(_), None) => problem(
                "client-key-file",
                "is required with client-cert-file".into(),
            ),
            (None, Some(_)) => problem(
                "client-cert-file",
                "is required with client-key-file".into(),
            ),
            (Some(cert), Some(key)) => match load_identity(cert, key) {
                Ok(pem) => trust.identity_pem = Some(pem),
                Err((key_name, why)) => problem(key_name, why),
            },
        }
        if problems.is_empty() {
            Ok(trust)
        } else {
            Err(problems)
        }
    }

    /// [`Self::load`], its problems added to a config's (and no extra trust then).
    pub fn load_noting(&self, section: &str, problems: &mut crate::config::Problems) -> HttpsTrust {
        self.load(section).unwrap_or_else(|found| {
            for problem in found {
                problems.add_error(problem);
            }
            HttpsTrust::default()
        })
    }
}

impl HttpsTrust {
    /// A client builder that trusts the system's and Mozilla's roots and these extra ones,
    /// presents the client certificate if there is one, and follows no redirect.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &self.ca_pem {
            // Checked in `load`: every certificate parses.
            for certificate in reqwest::Certificate::from_pem_bundle(pem).unwrap_or_default() {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some(pem) = &self.identity_pem
            && let Ok(identity) = reqwest::Identity::from_pem(pem)
        {
            builder = builder.identity(identity);
        }
        builder
    }

    /// [`Self::client_builder`], built the first time and the same client after (cheap to
    /// clone); an error says why no client could be made. Bound each request's time on the
    /// request.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        if let Some(client) = self.built.get() {
            return Ok(client.clone());
        }
        let client = self
            .client_builder()
            .build()
            .map_err(|error| format!("cannot build an HTTPS client: {error}"))?;
        Ok(self.built.get_or_init(|| client).clone())
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.identity_pem.is_some()
    }
}

/// A warning for an `http://` URL that carries `secret` (`"the PagerDuty routing key"`), or
/// `None` for https://, for a loopback host (nothing leaves the machine), and for anything
/// else (which the URL's own check refuses).
pub fn plain_http_warning(field: &str, url: &str, secret: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    (parsed.scheme() == "http" && !loopback).then(|| {
        format!(
            "{field} is plain http:// and carries {secret}: anyone on the path can read it; \
             use https://"
        )
    })
}

/// Whether a request header's name says it carries a credential (`Authorization`, `Cookie`,
/// `X-Api-Key`, `X-Auth-Token`...): what [`plain_http_warning`] is worth saying for.
pub fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "key",
        "secret",
        "auth",
        "password",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// A PEM file's bytes: a regular file (not a FIFO or a device) of at most
/// [`MAX_TLS_FILE_BYTES`].
pub fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let metadata = file
        .metadata()
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut pem = Vec::new();
    file.take(MAX_TLS_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if pem.len() as u64 > MAX_TLS_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_TLS_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(pem)
}

fn check_roots(path: &Path, pem: Vec<u8>) -> Result<Vec<u8>, String> {
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certificates) if !certificates.is_empty() => Ok(pem),
        Ok(_) => Err(format!("{} holds no certificate", path.display())),
        Err(error) => Err(format!(
            "{} is not PEM certificates: {error}",
            path.display()
        )),
    }
}

/// The client's chain and key as one PEM, checked to make an identity rustls takes; an error
/// names the key of the file at fault.
fn load_identity(cert: &Path, key: &Path) -> Result<Vec<u8>, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_pem = read_pem(cert).map_err(|why| ("client-cert-file", why))?;
    let key_pem = read_pem(key).map_err(|why| ("client-key-file", why))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|chain| !chain.is_empty())
        .ok_or_else(|| {
            (
                "client-cert-file",
                format!("{} holds no PEM certificate", cert.display()),
            )
        })?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        (
            "client-key-file",
            format!("{} holds no PEM private key", key.display()),
        )
    })?;
    // The key must be the certificate's: a mismatch would only show as refused handshakes.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::ring::default_provider()));
    let signing_key = provider
        .key_provider
        .load_private_key(private_key)
        .map_err(|error| ("client-key-file", format!("{}: {error}", key.display())))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    if let Err(error) = certified.keys_match() {
        return Err((
            "client-key-file",
            format!(
                "{} is not the key of {}: {error}",
                key.display(),
                cert.display()
            ),
        ));
    }
    let mut pem = cert_pem;
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend_from_slice(&key_pem);
    reqwest::Identity::from_pem(&pem).map_err(|error| {
        (
            "client-cert-file",
            format!("{} with its key: {error}", cert.display()),
        )
    })?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_ca::{DevCa, Subject};
    use crate::identity::Kind;

    fn files(dir: &Path) -> (DevCa, HttpsFiles) {
        crate::tls::install_crypto_provider();
        let ca = DevCa::generate("client CA").unwrap();
        let (cert, key) = ca
            .issue(&Subject::new(Kind::Automation, "rewind"), &[])
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("client.pem"), cert).unwrap();
        std::fs::write(dir.join("client.key"), key).unwrap();
        let files = HttpsFiles {
            ca_file: Some(dir.join("ca.pem")),
            client_cert_file: Some(dir.join("client.pem")),
            client_key_file: Some(dir.join("client.key")),
        };
        (ca, files)
    }

    #[test]
    fn good_files_load_and_every_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, good) = files(dir.path());
        let trust = good.load("alertmanager").unwrap();
        assert!(trust.has_client_certificate());
        trust.client().unwrap();

        let other = DevCa::generate("other").unwrap();
        let (_, other_key) = other.issue(&Subject::new(Kind::User, "x"), &[]).unwrap();
        std::fs::write(dir.path().join("other.key"), other_key).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
        let cases = [
            (
                HttpsFiles {
                    client_cert_file: good.client_cert_file.clone(),
                    ..HttpsFiles::default()
                },
                "s.client-key-file: is required with client-cert-file",
            ),
            (
                HttpsFiles {
                    client_key_file: good.client_key_file.clone(),
                    ..HttpsFiles::default()
                },
                "s.client-cert-file: is required with client-key-file",
            ),
            (
                HttpsFiles {
                    client_key_file: Some(dir.path().join("other.key")),
                    ..good.clone()
                },
                "is not the key of",
            ),
            (
                HttpsFiles {
                    ca_file: Some(dir.path().join("junk.pem")),
                    ..HttpsFiles::default()
                },
                "s.ca-file: ",
            ),
            (
                HttpsFiles {
                    client_cert_file: Some(dir.path().join("junk.pem")),
                    ..good.clone()
                },
                "s.client-cert-file: ",
            ),
            (
                HttpsFiles {
                    ca_file: Some(dir.path().to_path_buf()),
                    ..HttpsFiles::default()
                },
                "is not a regular file",
            ),
            (
                HttpsFiles {
                    ca_file: Some(dir.path().join("missing.pem")),
                    ..HttpsFiles::default()
                },
                "cannot read",
            ),
        ];
        for (files, expected) in cases {
            let problems = files.load("s").unwrap_err();
            assert!(
                problems.iter().any(|problem| problem.contains(expected)),
                "{files:?}: {problems:?}"
            );
        }
    }

    /// An HTTPS server on loopback that asks for a client certificate from `client_ca` and
    /// answers every request 200 over HTTP/1.0; its own certificate comes from `server_ca`.
    async fn server_requiring_client(server_ca: &DevCa, client_ca: &DevCa) -> String {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (cert, key) = server_ca
            .issue(&Subject::new(Kind::Member, "endpoint"), &["127.0.0.1"])
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(client_ca.cert_pem().as_bytes()) {
            roots.add(certificate.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let answer = "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_server_of_a_private_ca_asking_for_a_client_certificate_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (client_ca, mut files) = files(dir.path());
        let server_ca = DevCa::generate("server CA").unwrap();
        std::fs::write(dir.path().join("ca.pem"), server_ca.cert_pem()).unwrap();
        let url = server_requiring_client(&server_ca, &client_ca).await;

        let trust = files.load("s").unwrap();
        let answer = trust.client().unwrap().get(&url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        // Without the CA file the client refuses the server (not in the system's store);
        // without the client certificate the server refuses the handshake.
        let untrusting = HttpsFiles {
            ca_file: None,
            ..files.clone()
        };
        let untrusting = untrusting.load("s").unwrap().client().unwrap();
        assert!(untrusting.get(&url).send().await.is_err());
        files.client_cert_file = None;
        files.client_key_file = None;
        let anonymous = files.load("s").unwrap().client().unwrap();
        assert!(anonymous.get(&url).send().await.is_err());
    }

    #[test]
    fn plain_http_is_warned_about_only_when_it_carries_a_secret_over_http() {
        let warning = plain_http_warning("incidents.webhook-url", "HTTP://pd/", "the key").unwrap();
        assert!(
            warning.contains("incidents.webhook-url is plain http://"),
            "{warning}"
        );
        for quiet in [
            "https://pd/",
            "http://127.0.0.1:6081/",
            "http://[::1]/",
            "http://localhost/",
        ] {
            assert!(
                plain_http_warning("f", quiet, "the key").is_none(),
                "{quiet}"
            );
        }
        assert!(is_credential_header("Authorization") && is_credential_header("X-Api-Key"));
        assert!(!is_credential_header("X-Ban-Url") && !is_credential_header("Content-Type"));
    }
}
