//! Connections before authentication are bounded: a flood of idle connections from one address
//! (more than the coordinator has file descriptors) does not stop an operator's call or a
//! scrape from another; idle connections are closed on both ports; refused handshakes are logged
//! (with the peer's address and why: not TLS, a certificate of another CA, an expired one) and
//! counted; and every client is told how many streams one connection may open.

use std::sync::Arc;
use std::time::Duration;

use rewind_proto::v1 as pb;
use rewind_shared::member_tls::pem_certificates;
use rewind_tests::{Coordinator, must_wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The coordinator may hold this many descriptors, soft and hard limit both.
const OPEN_FILES: u64 = 512;
/// More idle connections than that, all from one address.
const FLOOD: usize = 600;

/// A plain TCP connection from `source` (another loopback address than the operator's).
async fn connect_from(source: &str, target: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(target.parse().unwrap()).await
}

/// Opens `count` connections from 127.0.0.2 and holds them; those the coordinator closes at
/// once still count as sent.
async fn flood(target: &str, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        match connect_from("127.0.0.2", target).await {
            Ok(stream) => held.push(stream),
            // The kernel's backlog may be full for a moment: that is the flood working.
            Err(error) => eprintln!("flood connect: {error}"),
        }
    }
    assert!(held.len() >= count / 2, "the flood opened connections");
    held
}

/// Waits for the server to close `stream` (a read returns end of file or an error).
async fn must_be_closed_within(stream: &mut TcpStream, limit: Duration, what: &str) {
    let mut buffer = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {limit:?}");
}

fn refused_count(metrics: &str, port: &str, reason: &str) -> f64 {
    let needle = format!("rewind_connections_refused_total{{port=\"{port}\",reason=\"{reason}\"}}");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&needle))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(http: &str) -> String {
    reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_connections_does_not_stop_an_operator_or_a_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start_with_open_files(
        dir.path(),
        "[http]\nlisten = \"127.0.0.1:0\"\n",
        OPEN_FILES,
    );
    let http = coordinator.http_address.clone();

    // gRPC: idle connections that never begin a TLS handshake.
    let held = flood(&coordinator.address, FLOOD).await;
    let mut operator = tokio::time::timeout(Duration::from_secs(20), coordinator.must_client())
        .await
        .expect("an operator connects while the gRPC port is flooded");
    tokio::time::timeout(
        Duration::from_secs(20),
        operator.list_hosts(pb::ListHostsRequest::default()),
    )
    .await
    .expect("an operator's call is answered while the gRPC port is flooded")
    .expect("list hosts");
    drop(held);

    // HTTP: idle connections that never send a request.
    let held = flood(&http, FLOOD).await;
    let metrics = tokio::time::timeout(Duration::from_secs(20), scrape(&http))
        .await
        .expect("a scrape is answered while the HTTP port is flooded");
    drop(held);

    // Most of each flood was closed at once for its address, and counted.
    assert!(
        refused_count(&metrics, "grpc", "address_full") >= (FLOOD / 2) as f64,
        "gRPC refusals counted:\n{metrics}"
    );
    let metrics = scrape(&http).await;
    assert!(
        refused_count(&metrics, "http", "address_full") >= (FLOOD / 2) as f64,
        "HTTP refusals counted:\n{metrics}"
    );
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(
        log.contains("Connection closed before it was served")
            && log.contains("address_full")
            && log.contains("127.0.0.2"),
        "the refusals are logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_and_bad_handshakes_logged() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::must_start_with(dir.path(), "[http]\nlisten = \"127.0.0.1:0\"\n");
    // A TLS handshake that never starts, and HTTP headers that never end.
    let mut silent = connect_from("127.0.0.3", &coordinator.address)
        .await
        .unwrap();
    let mut slow = connect_from("127.0.0.3", &coordinator.http_address)
        .await
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A kept-alive HTTP connection that goes quiet after its request.
    let mut quiet = connect_from("127.0.0.3", &coordinator.http_address)
        .await
        .unwrap();
    quiet
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Both timeouts are 10 s; 40 s leaves room for a loaded machine.
    let limit = Duration::from_secs(40);
    must_be_closed_within(&mut silent, limit, "a connection with no TLS handshake").await;
    must_be_closed_within(&mut slow, limit, "an HTTP request whose headers never end").await;
    must_be_closed_within(&mut quiet, limit, "an idle kept-alive HTTP connection").await;

    // Not TLS at all: refused, logged with the address, counted.
    let mut plain = connect_from("127.0.0.4", &coordinator.address)
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    must_be_closed_within(&mut plain, limit, "a connection that is not TLS").await;
    let log_path = dir.path().join("coordinator.log");
    must_wait(
        Duration::from_secs(10),
        "the refused handshake logged",
        || {
            let log = std::fs::read_to_string(&log_path).unwrap();
            log.lines()
                .any(|line| line.contains("handshake_failed") && line.contains("127.0.0.4"))
                .then_some(())
        },
    );

    // A certificate of another CA, and an expired one of this cluster's: refused, each logged
    // with its peer's address and cause, once however often the peer retries.
    let stranger = rewind_shared::dev_ca::DevCa::generate("another cluster").unwrap();
    let operator =
        rewind_shared::dev_ca::Subject::new(rewind_shared::identity::Kind::User, "operator");
    let (cert, key) = stranger.issue(&operator, &[]).unwrap();
    for _ in 0..3 {
        assert!(!handshake_from("127.0.0.5", &coordinator, &cert, &key).await);
    }
    let (cert, key) = coordinator.ca().issue_for(&operator, &[], 1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!handshake_from("127.0.0.6", &coordinator, &cert, &key).await);
    let logged = |address: &str, cause: &str| {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .filter(|line| line.contains(address) && line.contains(cause))
            .count()
    };
    must_wait(Duration::from_secs(10), "the refusals logged", || {
        (logged("127.0.0.5", "unknown_ca") > 0 && logged("127.0.0.6", "expired_certificate") > 0)
            .then_some(())
    });
    assert_eq!(
        logged("127.0.0.5", "unknown_ca"),
        1,
        "logged once, not per retry"
    );
    assert_eq!(logged("127.0.0.4", "not_tls"), 1);
    // A call without a certificate (the handshake is allowed, for joins and health checks):
    // refused, and said once for its peer too.
    let anonymous = rewind_tests::anonymous_channel(
        &coordinator.tls_dir().join("ca.pem"),
        &coordinator.address,
    )
    .await
    .unwrap();
    let mut client = pb::control_service_client::ControlServiceClient::new(anonymous);
    for _ in 0..3 {
        let refused = client
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    must_wait(Duration::from_secs(10), "the anonymous call logged", || {
        (logged("127.0.0.1", "without a client certificate") > 0).then_some(())
    });
    assert_eq!(logged("127.0.0.1", "without a client certificate"), 1);

    let metrics = scrape(&coordinator.http_address).await;
    assert!(refused_count(&metrics, "grpc", "handshake_failed") >= 5.0);
    assert!(refused_count(&metrics, "grpc", "handshake_timeout") >= 1.0);
}

/// A TLS handshake from `source` presenting `cert`/`key` (PEM), trusting the cluster's CA;
/// whether the server accepted it (a refused client certificate shows on the first read).
async fn handshake_from(source: &str, coordinator: &Coordinator, cert: &str, key: &str) -> bool {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certificates(&coordinator.tls_dir().join("ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = connect_from(source, &coordinator.address).await.unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3: the server judges the client's certificate after the client thinks it is done.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buffer = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buffer)).await,
        Ok(Ok(read)) if read > 0
    )
}

/// `SETTINGS_MAX_CONCURRENT_STREAMS`, as the server's first SETTINGS frame states it.
async fn advertised_max_streams(coordinator: &Coordinator) -> Option<u32> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certificates(&coordinator.tls_dir().join("ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(&coordinator.address).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    // The client preface and an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    loop {
        let mut header = [0u8; 9];
        tls.read_exact(&mut header).await.ok()?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        tls.read_exact(&mut payload).await.ok()?;
        // A SETTINGS frame that is not an acknowledgement.
        if header[3] == 0x4 && header[4] & 0x1 == 0 {
            return payload.chunks_exact(6).find_map(|setting| {
                (u16::from_be_bytes([setting[0], setting[1]]) == 0x3)
                    .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_is_told_how_many_streams_a_connection_may_open() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::must_start(dir.path());
    assert_eq!(advertised_max_streams(&coordinator).await, Some(128));
}
