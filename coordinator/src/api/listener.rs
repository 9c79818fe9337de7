//! The coordinator's TLS listener.
//!
//! Client certificates are asked for but not required at the handshake: a host joining with a
//! token has none yet. Whether a call needs one is the gate's to decide from the method's
//! permission, and every method but `JoinService/Join` and the health service's does. A presented certificate must chain
//! to the cluster's CA, or the handshake fails. The coordinator's own certificate is read again
//! when its files change, so a renewed certificate is served without a restart. Handshakes are
//! bounded in time, in number and per address (see [`crate::admission`]), so idle or slow
//! connections cannot hold the port.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rewind_shared::member_tls::pem_certificates;
use rewind_shared::tls::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::admission::{
    self, Admission, Admitted, ConnectionBudget, ConnectionStats, Refusal, Refusals,
};
use crate::errors::CoordinatorError;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a new connection waits for a handshake place when every place is taken.
const HANDSHAKE_PLACE_WAIT: Duration = Duration::from_secs(2);
/// Most connections without a client certificate open at once (hosts joining).
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 64;
/// How long a connection without a client certificate may stay open: long enough to join.
pub const ANONYMOUS_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections whose handshake is done and that the server has not taken yet.
const ACCEPTED_QUEUE: usize = 64;
/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Who is at the other end of a connection, for the gate.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The chain the client presented, leaf first; `None` if it presented none.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One accepted connection after its TLS handshake. It holds its place among the connections
/// (and the anonymous ones) until it is dropped; one without a certificate ends at its deadline.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _anonymous_slot: Option<Admitted>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TlsConnection {
    /// Past its deadline, the connection reads and writes nothing more.
    fn expired(&mut self, context: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(context).is_ready())
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "a connection without a client certificate lives 30 s",
    )
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(context) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(context) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_write(context, buffer)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(context) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(context) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(context) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The coordinator's certificate, swapped when its files change.
#[derive(Debug)]
struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
    /// The files as last found unloadable, and how many checks found them so, to warn once
    /// per change.
    failed: std::sync::Mutex<Option<(Stamp, u32)>>,
}

type Stamp = [Option<SystemTime>; 2];

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0,
        ))
    }
}

impl ReloadingCertificate {
    fn open(files: &TlsFiles) -> Result<Self, String> {
        let stamp = stamp(&files.cert, &files.key);
        let key = load_certified_key(&files.cert, &files.key)?;
        Ok(Self {
            cert: files.cert.clone(),
            key: files.key.clone(),
            current: RwLock::new((key, stamp)),
            failed: std::sync::Mutex::new(None),
        })
    }

    /// Loads the files again if they changed; keeps what it has if they cannot be loaded (a
    /// renewal half written: the next check finds them whole).
    fn refresh(&self) {
        let now = stamp(&self.cert, &self.key);
        if self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
            == now
        {
            return;
        }
        match load_certified_key(&self.cert, &self.key) {
            Ok(key) => {
                info!(certificate = %self.cert.display(), "The coordinator's certificate changed; serving the new one.");
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = (key, now);
            }
            Err(error) => {
                let mut failed = self
                    .failed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // A renewal half written loads at the next check; one that stays broken is said,
                // once.
                let checks = match *failed {
                    Some((stamp, checks)) if stamp == now => checks + 1,
                    _ => 1,
                };
                *failed = Some((now, checks));
                if checks == 2 {
                    warn!(%error, certificate = %self.cert.display(), "The coordinator's certificate files changed and do not load; still serving the previous certificate.");
                }
            }
        }
    }
}

fn stamp(cert: &std::path::Path, key: &std::path::Path) -> Stamp {
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    [modified(cert), modified(key)]
}

fn load_certified_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<CertifiedKey>, String> {
    let chain = pem_certificates(cert).map_err(|error| error.to_string())?;
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|error| format!("{}: {error}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private_key, &provider)
        .map_err(|error| format!("{}: {error}", cert.display()))?;
    Ok(Arc::new(certified))
}

/// The server's TLS settings from `files`, and a task that reloads its certificate when the
/// files change (it ends when the returned config is dropped).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, CoordinatorError> {
    let tls_error =
        |error: String| CoordinatorError::invalid("tls", format!("load TLS files: {error}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in pem_certificates(&files.ca).map_err(|error| tls_error(error.to_string()))? {
        roots
            .add(certificate)
            .map_err(|error| tls_error(format!("{}: {error}", files.ca.display())))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|error| tls_error(error.to_string()))?;
    let resolver = Arc::new(ReloadingCertificate::open(files).map_err(tls_error)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone() as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let watched = Arc::downgrade(&config);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RELOAD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if watched.strong_count() == 0 {
                return;
            }
            resolver.refresh();
        }
    });
    Ok(config)
}

/// Accepts connections on `listener` and hands over those whose TLS handshake completed: at
/// most `budget.grpc` open (further ones wait in the kernel's backlog), at most
/// [`admission::MAX_HANDSHAKES`] in their handshake and [`admission::HANDSHAKES_PER_ADDRESS`]
/// from one address (further ones are closed at once), each handshake within
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_ANONYMOUS_CONNECTIONS`] without a certificate
/// ([`admission::ANONYMOUS_PER_ADDRESS`] per address), each for
/// [`ANONYMOUS_CONNECTION_LIFETIME`]. Stops accepting when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    budget: ConnectionBudget,
    stats: ConnectionStats,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConnection>> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let connections = Arc::new(Semaphore::new(budget.grpc));
    let handshakes = Admission::new(admission::MAX_HANDSHAKES, admission::HANDSHAKES_PER_ADDRESS);
    let anonymous = Admission::new(MAX_ANONYMOUS_CONNECTIONS, admission::ANONYMOUS_PER_ADDRESS);
    let refusals = Arc::new(Refusals::new("grpc", stats));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&connections).acquire_owned().await else {
                return;
            };
            let (tcp, remote) = tokio::select! {
                _ = sender.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: wait rather than spin.
                        warn!(%error, "Cannot accept a connection.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // No Nagle: a response larger than one segment would otherwise wait for the
            // client's delayed ACK (40 ms on Linux) before its last part is sent.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let anonymous = Arc::clone(&anonymous);
            let refusals = Arc::clone(&refusals);
            let handshakes = Arc::clone(&handshakes);
            tokio::spawn(async move {
                // Over its address's share: closed at once. All handshake places taken: waits
                // a moment for one (it holds only its connection slot meanwhile).
                let handshake = match handshakes.admit(remote.ip(), HANDSHAKE_PLACE_WAIT).await {
                    Ok(handshake) => handshake,
                    Err(refusal) => {
                        refusals.refuse(
                            refusal,
                            remote.ip(),
                            "too many TLS handshakes in progress",
                        );
                        return;
                    }
                };
                let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                let stream = match accepted {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        let cause = crate::admission::handshake_cause(&error);
                        refusals.refuse(Refusal::Handshake(cause), remote.ip(), &error.to_string());
                        return;
                    }
                    Err(_) => {
                        refusals.refuse(Refusal::HandshakeTimeout, remote.ip(), "");
                        return;
                    }
                };
                let certificates: Option<Arc<Vec<CertificateDer<'static>>>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .filter(|chain| !chain.is_empty())
                    .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
                let (anonymous_slot, deadline) = if certificates.is_some() {
                    (None, None)
                } else {
                    match anonymous.try_admit(remote.ip()) {
                        Ok(admitted) => (
                            Some(admitted),
                            Some(Box::pin(tokio::time::sleep(ANONYMOUS_CONNECTION_LIFETIME))),
                        ),
                        Err(refusal) => {
                            refusals.refuse(
                                refusal,
                                remote.ip(),
                                "too many connections without a client certificate",
                            );
                            return;
                        }
                    }
                };
                let connection = TlsConnection {
                    stream,
                    info: PeerInfo {
                        remote: Some(remote),
                        certificates,
                    },
                    _slot: slot,
                    _anonymous_slot: anonymous_slot,
                    deadline,
                };
                // Bounded: the server takes connections as fast as they come; if it stopped,
                // this ends with it.
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.send(Ok(connection))).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
