//! Admitting connections before anyone is authenticated.
//!
//! A connection costs a file descriptor and a task from the moment it is accepted, long before
//! its caller has shown a certificate or a token. So each port bounds how many connections may
//! be at that stage at once, and how many of those one address may hold: a flood of idle or
//! half-open connections from one address is closed at once instead of crowding out an operator
//! or an agent arriving from another. The bounds follow the process's open-files limit, which
//! is raised to its hard limit at start. Refusals are counted for `/metrics` and logged with the
//! peer's address and why ([`PeerLog`]): once per peer and reason every [`PEER_LOG_EVERY`], at
//! most [`MAX_LOG_LINES_PER_WINDOW`] lines per port every [`LOG_EVERY`], so a misconfigured
//! client is visible from the server side and a flood cannot fill the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// The window in which a port logs at most [`MAX_LOG_LINES_PER_WINDOW`] refusals.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Refusals one port logs per [`LOG_EVERY`]; further ones are counted in the next line.
pub const MAX_LOG_LINES_PER_WINDOW: u32 = 32;
/// How long one peer's refusal for one reason goes unlogged after it was logged.
pub const PEER_LOG_EVERY: Duration = Duration::from_secs(600);
/// Peers and reasons whose last logged refusal is remembered; past it, the memory starts over.
const MAX_REMEMBERED_PEERS: usize = 4096;
/// Descriptors kept for everything but client connections: the stores, Raft peers, snapshots.
pub const RESERVED_FILES: u64 = 128;
/// Most connections open on the gRPC port (each agent holds one).
pub const MAX_GRPC_CONNECTIONS: u64 = 16_384;
/// Most connections open on the HTTP port (Prometheus, Alertmanager, webhooks).
pub const MAX_HTTP_CONNECTIONS: u64 = 256;
/// Most TLS handshakes one address may have in progress on the gRPC port.
pub const HANDSHAKES_PER_ADDRESS: usize = 16;
/// Most TLS handshakes in progress on the gRPC port.
pub const MAX_HANDSHAKES: usize = 256;
/// Most connections one address may hold open on the HTTP port.
pub const HTTP_CONNECTIONS_PER_ADDRESS: usize = 32;
/// Most connections without a client certificate (hosts joining) one address may hold.
pub const ANONYMOUS_PER_ADDRESS: usize = 4;

/// How many connections each port may hold, from the open-files limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBudget {
    pub open_files: u64,
    pub grpc: usize,
    pub http: usize,
}

impl ConnectionBudget {
    /// Splits what the open-files limit leaves after [`RESERVED_FILES`]: an eighth (at most
    /// [`MAX_HTTP_CONNECTIONS`]) to the HTTP port, the rest (at most [`MAX_GRPC_CONNECTIONS`])
    /// to gRPC; at least a few each, so a tiny limit still serves.
    pub fn from_open_files(open_files: u64) -> Self {
        let available = open_files.saturating_sub(RESERVED_FILES).max(32);
        let http = (available / 8).clamp(8, MAX_HTTP_CONNECTIONS);
        let grpc = (available - http).clamp(16, MAX_GRPC_CONNECTIONS);
        Self {
            open_files,
            grpc: grpc as usize,
            http: http as usize,
        }
    }
}

/// Raises this process's soft open-files limit to its hard limit (as Go and systemd services
/// do) and returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub port: String,
    pub reason: String,
}

/// Connections refused before authentication, by port and reason, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats {
    pub refused: Family<RefusedLabels, Counter>,
}

/// Why a connection was closed before it was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The port holds as many connections at this stage as it may.
    PortFull,
    /// This address holds as many as one address may.
    AddressFull,
    /// The TLS handshake failed, and why (a certificate not of this cluster, expired, not TLS
    /// at all): see [`handshake_cause`].
    Handshake(&'static str),
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::PortFull => "port_full",
            Refusal::AddressFull => "address_full",
            Refusal::Handshake(_) => "handshake_failed",
            Refusal::HandshakeTimeout => "handshake_timeout",
        }
    }

    /// What exactly went wrong, where that is known (a handshake's cause).
    fn cause(self) -> &'static str {
        match self {
            Refusal::Handshake(cause) => cause,
            _ => "",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Refusal::PortFull => "the port holds as many connections at this stage as it may",
            Refusal::AddressFull => "the address holds as many connections as one address may",
            Refusal::Handshake(_) => "the TLS handshake failed",
            Refusal::HandshakeTimeout => "the TLS handshake did not finish in time",
        }
    }
}

/// Why a TLS handshake failed, as a log line and an operator put it: `unknown_ca` (a certificate
/// of another CA), `expired_certificate`, `not_tls` (plain HTTP to the gRPC port)...
pub fn handshake_cause(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as Certificate, Error as Tls};
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Tls>())
    {
        Some(Tls::InvalidCertificate(Certificate::UnknownIssuer)) => "unknown_ca",
        Some(Tls::InvalidCertificate(
            Certificate::Expired | Certificate::ExpiredContext { .. },
        )) => "expired_certificate",
        Some(Tls::InvalidCertificate(
            Certificate::NotValidYet | Certificate::NotValidYetContext { .. },
        )) => "certificate_not_yet_valid",
        Some(Tls::InvalidCertificate(Certificate::Revoked)) => "revoked_certificate",
        Some(Tls::InvalidCertificate(_)) => "bad_certificate",
        Some(Tls::NoCertificatesPresented) => "no_certificate",
        Some(Tls::InvalidMessage(_)) => "not_tls",
        Some(Tls::PeerIncompatible(_)) => "incompatible_tls",
        // The client refused ours (it does not trust this cluster's CA, say).
        Some(Tls::AlertReceived(_)) => "client_refused_server_certificate",
        Some(_) => "tls_error",
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => "closed_during_handshake",
        None => "io_error",
    }
}

/// Decides which refusals are logged: each peer and reason once per [`PEER_LOG_EVERY`], and at
/// most [`MAX_LOG_LINES_PER_WINDOW`] lines per [`LOG_EVERY`] in all; the rest are counted and
/// the count goes with the next line logged.
#[derive(Debug)]
pub struct PeerLog {
    state: Mutex<PeerLogState>,
}

#[derive(Debug)]
struct PeerLogState {
    logged: HashMap<(IpAddr, &'static str), Instant>,
    window_start: Instant,
    lines_in_window: u32,
    not_logged: u64,
}

impl Default for PeerLog {
    fn default() -> Self {
        Self {
            state: Mutex::new(PeerLogState {
                logged: HashMap::new(),
                window_start: Instant::now(),
                lines_in_window: 0,
                not_logged: 0,
            }),
        }
    }
}

impl PeerLog {
    /// `Some(refusals not logged since the last line)` when this one is to be logged.
    pub fn admit(&self, peer: IpAddr, reason: &'static str) -> Option<u64> {
        self.admit_at(peer, reason, Instant::now())
    }

    fn admit_at(&self, peer: IpAddr, reason: &'static str, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if now.duration_since(state.window_start) >= LOG_EVERY {
            state.window_start = now;
            state.lines_in_window = 0;
        }
        let key = (peer, reason);
        let lately = state
            .logged
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < PEER_LOG_EVERY);
        if lately || state.lines_in_window >= MAX_LOG_LINES_PER_WINDOW {
            state.not_logged += 1;
            return None;
        }
        if state.logged.len() >= MAX_REMEMBERED_PEERS {
            state.logged.clear();
        }
        state.logged.insert(key, now);
        state.lines_in_window += 1;
        Some(std::mem::take(&mut state.not_logged))
    }
}

/// Counts and logs refusals on one port: every refusal is counted; it is logged with the peer's
/// address as [`PeerLog`] allows.
#[derive(Debug)]
pub struct Refusals {
    port: &'static str,
    stats: ConnectionStats,
    log: PeerLog,
}

impl Refusals {
    pub fn new(port: &'static str, stats: ConnectionStats) -> Self {
        Self {
            port,
            stats,
            log: PeerLog::default(),
        }
    }

    pub fn refuse(&self, refusal: Refusal, remote: IpAddr, detail: &str) {
        self.stats
            .refused
            .get_or_create(&RefusedLabels {
                port: self.port.to_string(),
                reason: refusal.as_str().to_string(),
            })
            .inc();
        let reason = match refusal.cause() {
            "" => refusal.as_str(),
            cause => cause,
        };
        let Some(not_logged) = self.log.admit(remote, reason) else {
            return;
        };
        warn!(
            port = self.port,
            %remote,
            reason = refusal.as_str(),
            cause = refusal.cause(),
            detail,
            not_logged_since_last = not_logged,
            "Connection closed before it was served: {}.",
            refusal.explain()
        );
    }
}

/// A bound on connections at one stage: so many in all, so many per address.
#[derive(Debug)]
pub struct Admission {
    total: Arc<Semaphore>,
    per_address_max: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place at a stage; given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    admission: Arc<Admission>,
}

impl Admission {
    pub fn new(total: usize, per_address_max: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total)),
            per_address_max,
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `address`, or why there is none. Never waits.
    pub fn try_admit(self: &Arc<Self>, address: IpAddr) -> Result<Admitted, Refusal> {
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Refusal::PortFull)?;
        self.admit_with(address, permit)
    }

    /// Like [`Admission::try_admit`], but waits up to `wait` for a place when the port is full
    /// (not when the address is): a burst from many addresses delays a newcomer, it does not
    /// turn it away.
    pub async fn admit(
        self: &Arc<Self>,
        address: IpAddr,
        wait: Duration,
    ) -> Result<Admitted, Refusal> {
        if self.held_by(address) >= self.per_address_max {
            return Err(Refusal::AddressFull);
        }
        let permit = tokio::time::timeout(wait, Arc::clone(&self.total).acquire_owned())
            .await
            .map_err(|_| Refusal::PortFull)?
            .map_err(|_| Refusal::PortFull)?;
        self.admit_with(address, permit)
    }

    fn held_by(&self, address: IpAddr) -> usize {
        self.per_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&address_key(address))
            .copied()
            .unwrap_or(0)
    }

    fn admit_with(
        self: &Arc<Self>,
        address: IpAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Admitted, Refusal> {
        let key = address_key(address);
        let mut per_address = self
            .per_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let held = per_address.entry(key).or_insert(0);
        if *held >= self.per_address_max {
            if *held == 0 {
                per_address.remove(&key);
            }
            return Err(Refusal::AddressFull);
        }
        *held += 1;
        Ok(Admitted {
            _permit: permit,
            address: key,
            admission: Arc::clone(self),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_address = self
            .admission
            .per_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(held) = per_address.get_mut(&self.address) {
            *held -= 1;
            if *held == 0 {
                per_address.remove(&self.address);
            }
        }
    }
}

/// What counts as one address: an IPv4 address, or an IPv6 /64 (what one subscriber or one
/// host is given, so a hostile one cannot take a new address per connection).
fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_and_reason_is_logged_once_a_while_and_a_flood_is_capped() {
        let log = PeerLog::default();
        let start = Instant::now();
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(log.admit_at(peer, "unknown_ca", start), Some(0));
        // The same peer and reason again: counted, not logged, until PEER_LOG_EVERY passed.
        assert_eq!(log.admit_at(peer, "unknown_ca", start), None);
        // Another reason of the same peer is news.
        assert_eq!(log.admit_at(peer, "expired_certificate", start), Some(1));
        let later = start + PEER_LOG_EVERY;
        assert_eq!(log.admit_at(peer, "unknown_ca", later), Some(0));
        // Many peers at once: MAX_LOG_LINES_PER_WINDOW lines a window, the rest counted.
        let flood = later + LOG_EVERY;
        let logged = (0..200u8)
            .filter(|last| {
                let peer = IpAddr::from([198, 51, 100, *last]);
                log.admit_at(peer, "not_tls", flood).is_some()
            })
            .count();
        assert_eq!(logged, MAX_LOG_LINES_PER_WINDOW as usize);
        let next_window = flood + LOG_EVERY;
        let told = log.admit_at(IpAddr::from([203, 0, 113, 1]), "not_tls", next_window);
        assert_eq!(told, Some(200 - u64::from(MAX_LOG_LINES_PER_WINDOW)));
    }

    #[test]
    fn handshake_failures_are_named_by_cause() {
        use rustls::{CertificateError, Error};
        let failed = |error: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, error);
        let cases = [
            (
                failed(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                "unknown_ca",
            ),
            (
                failed(Error::InvalidCertificate(CertificateError::Expired)),
                "expired_certificate",
            ),
            (
                failed(Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "not_tls",
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                "closed_during_handshake",
            ),
        ];
        for (error, cause) in cases {
            assert_eq!(handshake_cause(&error), cause, "{error}");
        }
    }

    #[test]
    fn one_address_cannot_take_every_place() {
        let admission = Admission::new(3, 2);
        let attacker: IpAddr = "127.0.0.2".parse().unwrap();
        let operator: IpAddr = "127.0.0.1".parse().unwrap();
        let first = admission.try_admit(attacker).unwrap();
        let _second = admission.try_admit(attacker).unwrap();
        assert_eq!(
            admission.try_admit(attacker).unwrap_err(),
            Refusal::AddressFull
        );
        let _operator = admission.try_admit(operator).unwrap();
        assert_eq!(
            admission.try_admit(operator).unwrap_err(),
            Refusal::PortFull
        );
        drop(first);
        assert!(admission.try_admit(attacker).is_ok());
        // A place given back, or refused, leaves no entry behind for its address.
        let admission = Admission::new(1, 2);
        let held = admission.try_admit(attacker).unwrap();
        assert!(admission.try_admit(operator).is_err());
        drop(held);
        assert!(admission.per_address.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_64_is_one_address() {
        let admission = Admission::new(10, 1);
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _held = admission.try_admit(first).unwrap();
        assert_eq!(
            admission.try_admit(same_64).unwrap_err(),
            Refusal::AddressFull
        );
        assert!(admission.try_admit(other_64).is_ok());
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        let _v4 = admission.try_admit("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            admission.try_admit(mapped).unwrap_err(),
            Refusal::AddressFull
        );
    }

    #[tokio::test]
    async fn a_full_port_makes_a_newcomer_wait_not_leave() {
        let admission = Admission::new(1, 4);
        let held = admission.try_admit("10.0.0.1".parse().unwrap()).unwrap();
        let waiting = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move {
                admission
                    .admit("10.0.0.2".parse().unwrap(), Duration::from_secs(30))
                    .await
                    .map(drop)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        let _held = admission.try_admit("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            admission
                .admit("10.0.0.3".parse().unwrap(), Duration::from_millis(10))
                .await
                .unwrap_err(),
            Refusal::PortFull
        );
    }

    #[test]
    fn the_budget_follows_the_open_files_limit() {
        let small = ConnectionBudget::from_open_files(512);
        assert_eq!((small.grpc, small.http), (336, 48));
        assert!(small.grpc as u64 + small.http as u64 + RESERVED_FILES <= 512);
        let large = ConnectionBudget::from_open_files(1 << 20);
        assert_eq!(
            (large.grpc as u64, large.http as u64),
            (MAX_GRPC_CONNECTIONS, MAX_HTTP_CONNECTIONS)
        );
        let tiny = ConnectionBudget::from_open_files(64);
        assert!(tiny.grpc >= 16 && tiny.http >= 8);
    }
}
