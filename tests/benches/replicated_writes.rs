//! Replicated write latency and throughput on a local three-member cluster of real processes:
//! rewind (gRPC with mutual TLS, `ControlService.RegisterRelease`, about 256 bytes per request)
//! and, when Debian's `etcd-server` is installed, etcd under the same load, side by side, twice:
//! like for like (its gRPC `KV/Put` with mutual TLS to clients and between members, 256-byte
//! values), then as earlier runs measured it (its JSON gateway `/v3/kv/put`, plain HTTP). Each
//! does one client writing one at a time, then 64 clients at once.
//!
//! Run: `cargo bench -p rewind-tests --bench replicated_writes`
//! (`REWIND_BENCH_WRITES` sets the writes per run, default 20,000.)
//!
//! With `REWIND_BENCH_AUDIT_HISTORY=100000` it also compares, in the same run, a cluster founded
//! at cluster version 6 (audit entries inside the state) with one at version 7 (entries in their
//! own store): each first takes that many audited writes (flag changes, which leave the rest of
//! the state as it is), then the same write runs, and the size of the leader's newest snapshot
//! on disk is printed beside the figures.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use prost::Message as _;
use rewind_proto::v1 as pb;
use rewind_proto::v1::member_service_client::MemberServiceClient;
use rewind_shared::dev_ca::{DevCa, Subject};
use rewind_shared::identity::Kind;
use rewind_shared::tls::TlsFiles;
use rewind_tests::ClusterHarness;
use tokio::task::JoinSet;
use tonic::transport::Channel;

const CLIENTS: usize = 64;
const PAYLOAD_BYTES: usize = 256;

struct Figures {
    p50: Duration,
    p99: Duration,
    writes_per_s: f64,
}

/// Runs `writes` writes from `clients` tasks; `write(n)` performs write number n.
async fn measure<F, Fut>(clients: usize, writes: usize, write: F) -> Figures
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let write = Arc::new(write);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let write = Arc::clone(&write);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            for number in (client..writes).step_by(clients) {
                let begun = Instant::now();
                if let Err(error) = write(number).await {
                    panic!("write {number}: {error}");
                }
                latencies.push(begun.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(writes);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("a writer panicked"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |share: f64| {
        latencies[((latencies.len() as f64 * share) as usize).min(latencies.len() - 1)]
    };
    Figures {
        p50: at(0.5),
        p99: at(0.99),
        writes_per_s: writes as f64 / elapsed.as_secs_f64(),
    }
}

/// A release registration of about `PAYLOAD_BYTES` encoded (run-unique version, sha256 digest,
/// a commit id and a request id filling the rest).
fn release_request(run: &str, number: usize) -> pb::RegisterReleaseRequest {
    let mut request = pb::RegisterReleaseRequest {
        request_id: format!("{run}-{number}-"),
        release: Some(pb::Release {
            service: "bench".into(),
            version: format!("{run}.{number}"),
            artifact_digest: format!("sha256:{:064x}", number),
            commit: format!("{:040x}", number),
            registered_at_ms: 0,
            ..Default::default()
        }),
    };
    let short = PAYLOAD_BYTES.saturating_sub(request.encoded_len());
    request.request_id.push_str(&"x".repeat(short));
    request
}

async fn bench_rewind(dir: &Path, writes: usize) -> Vec<(usize, Figures)> {
    bench_rewind_at(dir, writes, 0, 0).await.0
}

/// The write runs on a cluster founded at `cluster_version` (0: the binary's) that first took
/// `history` audited flag changes; and the size of the leader's newest snapshot file after.
async fn bench_rewind_at(
    dir: &Path,
    writes: usize,
    cluster_version: u32,
    history: usize,
) -> (Vec<(usize, Figures)>, u64) {
    let cluster = ClusterHarness::must_start_for_benchmark(dir, 3, cluster_version);
    let (_, mut client) = cluster.must_leader().await;
    let service = pb::Service {
        rto_s: 0,
        freeze_windows: vec![],
        drift_policy: String::new(),
        isolate_after_failures: 0,
        name: "bench".into(),
        depends_on: vec![],
        policy: None,
        synthetics: vec![],
        rollback_steps: Vec::new(),
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: "bench".into(),
            service: Some(service),
        })
        .await
        .expect("put the bench service");
    println!(
        "rewind request size: {} bytes",
        release_request("r1", 0).encoded_len()
    );
    if history > 0 {
        let client = client.clone();
        let started = Instant::now();
        measure(CLIENTS, history, move |number| {
            let mut client = client.clone();
            async move {
                client
                    .set_flag(pb::SetFlagRequest {
                        request_id: format!("history-{number}"),
                        service: "bench".into(),
                        name: "history".into(),
                        enabled: number % 2 == 0,
                        reason: "benchmark history".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|status| status.to_string())
            }
        })
        .await;
        println!(
            "cluster version {cluster_version}: {history} audited flag changes in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    // The floor under every write: one gRPC call over mutual TLS that does not touch Raft.
    let (leader, _) = cluster.must_leader().await;
    let channel = cluster
        .member_channel_for(&cluster.addresses[leader as usize - 1])
        .await
        .expect("a channel to the leader");
    let floor = measure(1, writes, move |_| {
        let mut member = MemberServiceClient::new(channel.clone());
        async move {
            member
                .get_member_status(pb::GetMemberStatusRequest { brief: true })
                .await
                .map(|_| ())
                .map_err(|status| status.to_string())
        }
    })
    .await;
    println!(
        "rewind gRPC+TLS round trip without Raft (MemberService, 1 client): p50 {:.2} ms, p99 {:.2} ms",
        floor.p50.as_secs_f64() * 1000.0,
        floor.p99.as_secs_f64() * 1000.0
    );
    let mut results = Vec::new();
    for (run, clients) in [("r1", 1), ("r64", CLIENTS)] {
        let client = client.clone();
        let figures = measure(clients, writes, move |number| {
            let mut client = client.clone();
            async move {
                client
                    .register_release(release_request(run, number))
                    .await
                    .map(|_| ())
                    .map_err(|status| status.to_string())
            }
        })
        .await;
        results.push((clients, figures));
    }
    let (leader, _) = cluster.must_leader().await;
    let snapshot_bytes = newest_snapshot_bytes(&dir.join(format!("member-{leader}")));
    (results, snapshot_bytes)
}

/// The size of the newest `*.state` snapshot file under `dir` (0 if none).
fn newest_snapshot_bytes(dir: &Path) -> u64 {
    let mut newest: Option<(std::time::SystemTime, u64)> = None;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "state")
            {
                let modified = metadata.modified().unwrap_or(std::time::UNIX_EPOCH);
                if newest.is_none_or(|(time, _)| modified > time) {
                    newest = Some((modified, metadata.len()));
                }
            }
        }
    }
    newest.map_or(0, |(_, bytes)| bytes)
}

/// Version 6 (entries in the state) against version 7 (entries in their store), after
/// `history` audited writes each: 6, 7, 7, 6, so each runs first and last once.
async fn bench_audit_history(dir: &Path, writes: usize, history: usize) {
    let mut rows = Vec::new();
    // Each version first once, so neither always runs on a warmer machine.
    for (pass, version) in [6, 7, 7, 6].into_iter().enumerate() {
        let dir = dir.join(format!("pass-{pass}-v{version}"));
        let (figures, snapshot_bytes) = bench_rewind_at(&dir, writes, version, history).await;
        rows.push((version, figures, snapshot_bytes));
    }
    println!(
        "\n{history} audit entries first, then {writes} writes per run, 3 members on loopback\n"
    );
    println!(
        "| cluster version | clients | p50 | p99 | writes/s | newest snapshot |\n| --- | --- | --- | --- | --- | --- |"
    );
    for (version, figures, snapshot_bytes) in &rows {
        for (clients, figures) in figures {
            println!(
                "| {version} | {clients} | {:.2} ms | {:.2} ms | {:.0} | {:.2} MiB |",
                figures.p50.as_secs_f64() * 1000.0,
                figures.p99.as_secs_f64() * 1000.0,
                figures.writes_per_s,
                *snapshot_bytes as f64 / (1024.0 * 1024.0)
            );
        }
    }
}

/// Mutual TLS for an etcd cluster, from a CA of its own: one certificate per member (serving
/// clients and peers, naming 127.0.0.1) and one for the benchmark's client.
struct EtcdPki {
    members: Vec<TlsFiles>,
    client: TlsFiles,
}

impl EtcdPki {
    fn write(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
        let ca = DevCa::generate("etcd bench CA").map_err(|error| error.to_string())?;
        ca.save(dir).map_err(|error| error.to_string())?;
        let members = (1..=3)
            .map(|id| {
                let subject = Subject::member(id, &format!("e{id}"));
                ca.write_identity(dir, &subject, &["127.0.0.1", "localhost"])
                    .map_err(|error| error.to_string())
            })
            .collect::<Result<_, _>>()?;
        let client = ca
            .write_identity(dir, &Subject::new(Kind::User, "bench"), &[])
            .map_err(|error| error.to_string())?;
        Ok(Self { members, client })
    }
}

/// A three-member etcd cluster on loopback (mutual TLS between members and with clients when
/// `pki` is given, plain HTTP otherwise), stopped when dropped.
struct Etcd {
    members: Vec<Child>,
    client_urls: Vec<String>,
}

impl Etcd {
    fn start(dir: &Path, pki: Option<&EtcdPki>, port_base: u16) -> Result<Self, String> {
        let scheme = if pki.is_some() { "https" } else { "http" };
        let ports = |base: u16| (1..=3).map(move |id| base + id).collect::<Vec<_>>();
        let peer_ports = ports(port_base + 10);
        let client_ports = ports(port_base);
        let cluster: Vec<String> = peer_ports
            .iter()
            .enumerate()
            .map(|(index, port)| format!("e{}={scheme}://127.0.0.1:{port}", index + 1))
            .collect();
        let mut members = Vec::new();
        for index in 0..3 {
            let name = format!("e{}", index + 1);
            let log = std::fs::File::create(dir.join(format!("{name}.log")))
                .map_err(|error| error.to_string())?;
            let client_url = format!("{scheme}://127.0.0.1:{}", client_ports[index]);
            let peer_url = format!("{scheme}://127.0.0.1:{}", peer_ports[index]);
            let mut command = Command::new("etcd");
            command
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(dir.join(&name))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new"]);
            if let Some(pki) = pki {
                let own = &pki.members[index];
                command
                    .args(["--client-cert-auth", "--peer-client-cert-auth"])
                    .arg("--trusted-ca-file")
                    .arg(&own.ca)
                    .arg("--cert-file")
                    .arg(&own.cert)
                    .arg("--key-file")
                    .arg(&own.key)
                    .arg("--peer-trusted-ca-file")
                    .arg(&own.ca)
                    .arg("--peer-cert-file")
                    .arg(&own.cert)
                    .arg("--peer-key-file")
                    .arg(&own.key);
            }
            let child = command
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|error| format!("start etcd: {error}"))?;
            members.push(child);
        }
        Ok(Self {
            members,
            client_urls: client_ports
                .iter()
                .map(|port| format!("{scheme}://127.0.0.1:{port}"))
                .collect(),
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// The two etcd messages the benchmark sends, as etcd's `rpc.proto` numbers their fields (the
/// rest of each response is skipped when decoding).
mod etcd_proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }
}

/// One unary call to etcd's gRPC API at `path` (`/etcdserverpb.KV/Put`).
async fn etcd_call<Request, Response>(
    channel: Channel,
    path: &'static str,
    request: Request,
) -> Result<Response, String>
where
    Request: prost::Message + Send + Sync + 'static,
    Response: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|error| error.to_string())?;
    grpc.unary(
        tonic::Request::new(request),
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|status| status.to_string())
}

/// A channel to the member that leads, once the cluster has one: gRPC with mutual TLS.
async fn etcd_leader_channel(etcd: &Etcd, pki: &EtcdPki) -> Result<Channel, String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        for url in &etcd.client_urls {
            let address = url.trim_start_matches("https://");
            let tls = pki
                .client
                .client_config_for_address(address)
                .map_err(|error| error.to_string())?;
            let Ok(endpoint) = Channel::from_shared(url.clone()) else {
                continue;
            };
            let Ok(channel) = endpoint.tls_config(tls).map_err(|e| e.to_string()) else {
                continue;
            };
            let channel = channel.connect_lazy();
            let status: Result<etcd_proto::StatusResponse, _> = etcd_call(
                channel.clone(),
                "/etcdserverpb.Maintenance/Status",
                etcd_proto::StatusRequest {},
            )
            .await;
            if let Ok(status) = status
                && status.leader != 0
                && status.header.map(|header| header.member_id) == Some(status.leader)
            {
                return Ok(channel);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("etcd (TLS) elected no leader within 30 s".into())
}

/// etcd as its clients use it in production: gRPC with mutual TLS, members talking TLS.
async fn bench_etcd_tls(dir: &Path, writes: usize) -> Result<Vec<(usize, Figures)>, String> {
    let pki = EtcdPki::write(&dir.join("tls"))?;
    let etcd = Etcd::start(dir, Some(&pki), 23790)?;
    let channel = etcd_leader_channel(&etcd, &pki).await?;
    let mut results = Vec::new();
    for (run, clients) in [("r1", 1), ("r64", CLIENTS)] {
        let channel = channel.clone();
        let figures = measure(clients, writes, move |number| {
            let request = etcd_proto::PutRequest {
                key: format!("{run}/{number}").into_bytes(),
                value: vec![b'v'; PAYLOAD_BYTES],
            };
            let channel = channel.clone();
            async move {
                etcd_call::<_, etcd_proto::PutResponse>(channel, "/etcdserverpb.KV/Put", request)
                    .await
                    .map(|_| ())
            }
        })
        .await;
        results.push((clients, figures));
    }
    Ok(results)
}

/// The leader's client URL over the plain-HTTP JSON gateway, once the cluster has one.
async fn etcd_gateway_leader(etcd: &Etcd, http: &reqwest::Client) -> Result<String, String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        for url in &etcd.client_urls {
            let Ok(response) = http
                .post(format!("{url}/v3/maintenance/status"))
                .body("{}")
                .send()
                .await
            else {
                continue;
            };
            let Ok(body) = response.bytes().await else {
                continue;
            };
            let Ok(status) = serde_json::from_slice::<serde_json::Value>(&body) else {
                continue;
            };
            let own = &status["header"]["member_id"];
            if !own.is_null() && *own == status["leader"] {
                return Ok(url.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("etcd (plain HTTP) elected no leader within 30 s".into())
}

/// The second row: etcd's JSON gateway over plain HTTP, as earlier runs measured it.
async fn bench_etcd_gateway(dir: &Path, writes: usize) -> Result<Vec<(usize, Figures)>, String> {
    let etcd = Etcd::start(dir, None, 23890)?;
    let http = reqwest::Client::new();
    let leader = Arc::new(etcd_gateway_leader(&etcd, &http).await?);
    let value = base64::engine::general_purpose::STANDARD.encode([b'v'; PAYLOAD_BYTES]);
    let mut results = Vec::new();
    for (run, clients) in [("r1", 1), ("r64", CLIENTS)] {
        let (http, leader, value) = (http.clone(), Arc::clone(&leader), value.clone());
        let figures = measure(clients, writes, move |number| {
            let key = base64::engine::general_purpose::STANDARD.encode(format!("{run}/{number}"));
            let body = format!(r#"{{"key":"{key}","value":"{value}"}}"#);
            let request = http.post(format!("{leader}/v3/kv/put")).body(body);
            async move {
                let response = request.send().await.map_err(|error| error.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("etcd answered {}", response.status()))
                }
            }
        })
        .await;
        results.push((clients, figures));
    }
    Ok(results)
}

fn make_dir(dir: &Path) -> Result<std::path::PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// `etcd --version`'s first line, so a table says what it was measured against.
fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "etcd not found".into())
}

fn print_row(system: &str, clients: usize, figures: &Figures) {
    println!(
        "| {system} | {clients} | {:.2} ms | {:.2} ms | {:.0} |",
        figures.p50.as_secs_f64() * 1000.0,
        figures.p99.as_secs_f64() * 1000.0,
        figures.writes_per_s
    );
}

/// A count from the variable `name`, `default` when unset; anything else than a number stops
/// the run naming it, rather than measuring something other than what was asked.
fn count_from_env(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a count (a whole number)")),
    }
}

fn main() {
    rewind_shared::tls::install_crypto_provider();
    let writes = count_from_env("REWIND_BENCH_WRITES", 20_000);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("a temp dir");
        let history = count_from_env("REWIND_BENCH_AUDIT_HISTORY", 0);
        if history > 0 {
            bench_audit_history(&dir.path().join("history"), writes, history).await;
        }
        let rewind = bench_rewind(&dir.path().join("rewind"), writes).await;
        let etcd_tls = match make_dir(&dir.path().join("etcd-tls")) {
            Ok(etcd_dir) => bench_etcd_tls(&etcd_dir, writes).await,
            Err(error) => Err(error),
        };
        let etcd_gateway = match make_dir(&dir.path().join("etcd-http")) {
            Ok(etcd_dir) => bench_etcd_gateway(&etcd_dir, writes).await,
            Err(error) => Err(error),
        };
        println!("\n{writes} writes per run, 3 members on loopback, {}\n", etcd_version());
        println!("| system | clients | p50 | p99 | writes/s |\n| --- | --- | --- | --- | --- |");
        for (clients, figures) in &rewind {
            print_row("rewind (gRPC, mTLS)", *clients, figures);
        }
        for (label, etcd) in [
            ("etcd (gRPC, mTLS, peer TLS)", &etcd_tls),
            ("etcd (JSON gateway, plain HTTP)", &etcd_gateway),
        ] {
            match etcd {
                Ok(etcd) => {
                    for (clients, figures) in etcd {
                        print_row(label, *clients, figures);
                    }
                }
                Err(error) => println!("{label} not measured: {error} (apt-get install etcd-server)"),
            }
        }
        for (label, etcd) in [("TLS", &etcd_tls), ("plain-HTTP gateway", &etcd_gateway)] {
            let Ok(etcd) = etcd else { continue };
            for ((clients, ours), (_, theirs)) in rewind.iter().zip(etcd) {
                println!(
                    "{clients} client(s): rewind/etcd ({label}) throughput {:.2}x, p50 {:.2} ms against {:.2} ms",
                    ours.writes_per_s / theirs.writes_per_s,
                    ours.p50.as_secs_f64() * 1000.0,
                    theirs.p50.as_secs_f64() * 1000.0,
                );
            }
        }
    });
}
