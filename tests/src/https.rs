//! An HTTPS endpoint on loopback with a certificate from a CA of its own, recording every
//! request (method, path, the headers asked for, body) and answering 200 with a fixed body: a
//! CDN's purge API or an application's synthetic check, as an agent reaches them.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject as _;

/// One request as the endpoint received it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The headers the endpoint was asked to keep, `name: value`.
    pub headers: Vec<String>,
    pub body: String,
}

pub struct HttpsRecorder {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The CA its certificate chains to (PEM), for the client's trust.
    pub ca_pem: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsRecorder {
    /// Listens on a free loopback port; keeps the values of `headers` from each request and
    /// answers `answer`.
    pub async fn must_start(headers: &[&str], answer: &'static str) -> Self {
        Self::must_start_asking(headers, answer, None).await
    }

    /// Like [`Self::must_start`], refusing any client without a certificate from `client_ca`
    /// (PEM) when one is given: mutual TLS, as an internal API behind a service mesh asks.
    pub async fn must_start_asking(
        headers: &[&str],
        answer: &'static str,
        client_ca: Option<&str>,
    ) -> Self {
        rewind_shared::tls::install_crypto_provider();
        let ca = rewind_shared::dev_ca::DevCa::generate("rewind test endpoint CA").unwrap();
        let subject =
            rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::Member, "endpoint");
        let (cert_pem, key_pem) = ca.issue(&subject, &["127.0.0.1", "localhost"]).unwrap();
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                {
                    roots.add(certificate.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let book = Arc::clone(&received);
        let kept: Arc<Vec<String>> =
            Arc::new(headers.iter().map(|name| name.to_string()).collect());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, book, kept) =
                    (acceptor.clone(), Arc::clone(&book), Arc::clone(&kept));
                tokio::spawn(async move {
                    // A handshake a client refuses (an unknown CA) is the client's to report.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        record(request, Arc::clone(&book), Arc::clone(&kept), answer)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url,
            ca_pem: ca.cert_pem().to_string(),
            received,
            task,
        }
    }

    /// The requests received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for HttpsRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    request: hyper::Request<hyper::body::Incoming>,
    book: Arc<Mutex<Vec<Received>>>,
    kept: Arc<Vec<String>>,
    answer: &'static str,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let headers = kept
        .iter()
        .filter_map(|name| {
            let value = parts.headers.get(name.as_str())?.to_str().ok()?;
            Some(format!("{name}: {value}"))
        })
        .collect();
    book.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    Ok(hyper::Response::new(Full::new(Bytes::from_static(
        answer.as_bytes(),
    ))))
}
