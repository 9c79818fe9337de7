//! Helpers for the integration tests: real `rewind-coordinator` and `rewind-agent` processes on
//! `127.0.0.1:0`, real mutual TLS from a dev CA, real sled directories.
//!
//! Helpers that panic on failure are named `must_*`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use rewind_proto::v1::control_service_client::ControlServiceClient;
use rewind_shared::dev_ca::{self, DevCa, Subject};
use rewind_shared::identity::Kind;
use rewind_shared::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

pub mod netns;
pub mod pg;
pub mod proxy;
pub mod shards;
pub mod sim;
pub use netns::PrivateNet;
pub use pg::Postgres;

static BUILD: Once = Once::new();

/// Path of a workspace binary, built (once per test run) with the test profile.
pub fn must_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps, the chaos binary from target/<profile>.
    let exe_dir = test_exe.parent().expect("target/<profile>");
    let profile_dir = if exe_dir.ends_with("deps") {
        exe_dir.parent().expect("target/<profile>")
    } else {
        exe_dir
    };
    // Benchmarks run from target/release and measure release binaries.
    let release = profile_dir.ends_with("release");
    BUILD.call_once(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .current_dir(&workspace)
            .args([
                "build",
                "--quiet",
                "--bin",
                "rewind-coordinator",
                "--bin",
                "rewind-agent",
                "--bin",
                "rewindctl",
            ])
            .args(release.then_some("--release"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    let path = profile_dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A child process killed (SIGKILL) when dropped. Dropped while its test panics, it prints the
/// tail of its log: the temporary directory holding the log goes with the test, and a failure
/// seen once in CI must be explainable from CI's output alone.
pub struct Process {
    pub child: Child,
    log: PathBuf,
}

impl Process {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many of a process's last log lines a failing test prints.
const LOG_TAIL_ON_FAILURE: usize = 60;

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

fn spawn(binary: &Path, args: &[&str], log: &Path) -> Process {
    spawn_in(None, binary, args, log)
}

fn spawn_in(namespace: Option<&str>, binary: &Path, args: &[&str], log: &Path) -> Process {
    spawn_with(namespace, binary, args, log, "")
}

/// How a process is started: directly, inside a network namespace, or under an open-files limit.
#[derive(Clone, Copy, Debug, Default)]
enum Launch<'a> {
    #[default]
    Direct,
    InNamespace(&'a str),
    /// `prlimit --nofile=N:N`: soft and hard limit both, so the process cannot raise it.
    WithOpenFiles(u64),
}

/// Starts `binary`, inside network namespace `namespace` when given (`ip netns exec` execs it,
/// so the child's pid is the binary's and a kill reaches it), with `REWIND_FAILPOINTS` set to
/// `failpoints` (crash points, see `rewind_shared::failpoint`). The log is appended to, so a
/// restarted process's log follows the one before.
fn spawn_with(
    namespace: Option<&str>,
    binary: &Path,
    args: &[&str],
    log: &Path,
    failpoints: &str,
) -> Process {
    let launch = namespace.map_or(Launch::Direct, Launch::InNamespace);
    spawn_launched(launch, binary, args, log, failpoints)
}

fn spawn_launched(
    launch: Launch<'_>,
    binary: &Path,
    args: &[&str],
    log: &Path,
    failpoints: &str,
) -> Process {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("create log");
    let mut command = match launch {
        Launch::InNamespace(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace]).arg(binary);
            command
        }
        Launch::WithOpenFiles(limit) => {
            let mut command = Command::new("prlimit");
            command
                .arg(format!("--nofile={limit}:{limit}"))
                .arg("--")
                .arg(binary);
            command
        }
        Launch::Direct => Command::new(binary),
    };
    let child = command
        .args(args)
        .env("REWIND_LOG", "info,sled=warn")
        .env("REWIND_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|error| panic!("start {}: {error}", binary.display()));
    Process {
        child,
        log: log.to_path_buf(),
    }
}

/// A single-member dev coordinator on a free loopback port.
pub struct Coordinator {
    pub dir: PathBuf,
    pub address: String,
    /// host:port of /metrics and the webhooks, empty unless its config has `[http]`.
    pub http_address: String,
    pub process: Process,
}

impl Coordinator {
    pub fn must_start(dir: &Path) -> Self {
        Self::must_start_with(dir, "")
    }

    /// A dev coordinator whose config file holds `config` (TOML), e.g. an `[escalation]`.
    pub fn must_start_with(dir: &Path, config: &str) -> Self {
        Self::must_start_listening(dir, config, "127.0.0.1:0")
    }

    /// Starts this coordinator again (after `process.kill()`) on the same data and address,
    /// so agents configured with it find it.
    pub fn must_restart(&mut self) {
        self.must_restart_with_failpoints("");
    }

    /// [`Coordinator::must_restart`] with crash points armed (`REWIND_FAILPOINTS`).
    pub fn must_restart_with_failpoints(&mut self, failpoints: &str) {
        self.process.kill();
        let config = std::fs::read_to_string(self.dir.join("coordinator.toml")).unwrap();
        *self = Self::must_start_listening_with(
            &self.dir.clone(),
            &config,
            &self.address.clone(),
            failpoints,
        );
    }

    /// Waits for the process to exit on its own (a crash point): up to `limit`.
    pub fn must_exit_within(&mut self, limit: Duration) {
        must_wait(limit, "the coordinator to crash at its failpoint", || {
            self.process.child.try_wait().ok().flatten()
        });
    }

    fn must_start_listening(dir: &Path, config: &str, listen: &str) -> Self {
        Self::must_start_listening_with(dir, config, listen, "")
    }

    /// A dev coordinator that may hold at most `open_files` descriptors (hard limit too).
    pub fn must_start_with_open_files(dir: &Path, config: &str, open_files: u64) -> Self {
        Self::must_start_launched(
            dir,
            config,
            "127.0.0.1:0",
            "",
            Launch::WithOpenFiles(open_files),
        )
    }

    fn must_start_listening_with(dir: &Path, config: &str, listen: &str, failpoints: &str) -> Self {
        Self::must_start_launched(dir, config, listen, failpoints, Launch::Direct)
    }

    fn must_start_launched(
        dir: &Path,
        config: &str,
        listen: &str,
        failpoints: &str,
        launch: Launch<'_>,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config_path = dir.join("coordinator.toml");
        std::fs::write(&config_path, config).unwrap();
        let addr_file = dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let http_addr_file = dir.join("http-addr");
        let _ = std::fs::remove_file(&http_addr_file);
        let data_dir = dir.join("data");
        let args = [
            "--dev",
            "--config",
            config_path.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            listen,
            "--addr-file",
            addr_file.to_str().unwrap(),
            "--http-addr-file",
            http_addr_file.to_str().unwrap(),
        ];
        let mut process = spawn_launched(
            launch,
            &must_binary("rewind-coordinator"),
            &args,
            &dir.join("coordinator.log"),
            failpoints,
        );
        let address = must_wait(Duration::from_secs(30), "the coordinator address", || {
            if let Ok(Some(status)) = process.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
                panic!("the coordinator exited with {status}:\n{log}");
            }
            std::fs::read_to_string(&addr_file).ok()
        });
        // Written before the gRPC address, so it is there by now if HTTP is on.
        let http_address = std::fs::read_to_string(&http_addr_file).unwrap_or_default();
        Self {
            dir: dir.to_path_buf(),
            address,
            http_address,
            process,
        }
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("data").join("tls")
    }

    /// Runs `rewindctl` against this coordinator as the dev operator.
    pub fn rewindctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(must_binary("rewindctl"))
            .args(["--coordinator", &self.address])
            .args(args)
            .env("REWIND_TLS_DIR", self.tls_dir())
            .env("REWIND_SERVER_NAME", "localhost")
            .output()
            .expect("run rewindctl")
    }

    pub fn ca(&self) -> DevCa {
        DevCa::load(&self.tls_dir()).expect("load dev CA")
    }

    /// A client authenticated as the dev `operator`.
    pub async fn must_client(&self) -> ControlServiceClient<Channel> {
        let files = TlsFiles::in_dir(&self.tls_dir(), dev_ca::OPERATOR);
        self.client_with(&files).await.expect("connect as operator")
    }

    /// The agent service as `host`'s agent would reach it (a certificate issued for it now),
    /// to speak its protocol by hand.
    pub async fn must_agent_client(
        &self,
        host: &str,
    ) -> rewind_proto::v1::agent_service_client::AgentServiceClient<Channel> {
        let files = self
            .ca()
            .write_identity(&self.tls_dir(), &Subject::new(Kind::Agent, host), &[])
            .unwrap();
        let channel = Endpoint::from_shared(format!("https://{}", self.address))
            .unwrap()
            .tls_config(files.client_config("localhost").unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        rewind_proto::v1::agent_service_client::AgentServiceClient::new(channel)
            .max_decoding_message_size(rewind_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(rewind_proto::MAX_MESSAGE_BYTES)
    }

    /// A client with any TLS files (or an error if the connection fails).
    pub async fn client_with(
        &self,
        files: &TlsFiles,
    ) -> Result<ControlServiceClient<Channel>, String> {
        let tls = files
            .client_config("localhost")
            .map_err(|error| error.to_string())?;
        let channel = Endpoint::from_shared(format!("https://{}", self.address))
            .unwrap()
            .tls_config(tls)
            .map_err(|error| error.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|error| format!("{error:?}"))?;
        Ok(ControlServiceClient::new(channel))
    }
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: how rewind signs its escalations
/// and checks generic webhooks, computed here independently of the coordinator's code.
pub fn webhook_signature(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POSTs `body` to the generic webhook at `http` (`http://host:port`), signed with `secret` now;
/// returns the status code and the answer's text.
pub async fn post_signed_webhook(http: &str, secret: &[u8], body: String) -> (u16, String) {
    let now = rewind_shared::time::now_ms();
    let signature = webhook_signature(secret, now, body.as_bytes());
    post_webhook_as_signed(http, now, &signature, body).await
}

/// POSTs a generic webhook with the timestamp and signature headers given as they are (to
/// send a request again, or spelled another way).
pub async fn post_webhook_as_signed(
    http: &str,
    timestamp_ms: u64,
    signature: &str,
    body: String,
) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{http}/v1/webhook"))
        .header("content-type", "application/json")
        .header("x-rewind-timestamp", timestamp_ms.to_string())
        .header("x-rewind-signature", signature)
        .body(body)
        .send()
        .await
        .expect("the coordinator answers HTTP");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A free loopback port (bound then released: another process could take it in between, which
/// on a test machine does not happen in practice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) on `port`, routing every
/// alert grouped by service to `webhook_url` with the bearer token in `token_file`, quickly.
pub fn must_start_alertmanager(
    dir: &Path,
    port: u16,
    webhook_url: &str,
    token_file: &Path,
) -> Process {
    let binary = ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("Alertmanager is not installed: apt-get install prometheus-alertmanager");
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"route:
  receiver: rewind
  group_by: ['service']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: rewind
    webhook_configs:
      - url: {webhook_url}
        send_resolved: false
        http_config:
          authorization:
            type: Bearer
            credentials_file: {token}
"#,
        token = token_file.display()
    );
    let config_path = dir.join("alertmanager.yml");
    std::fs::write(&config_path, config).unwrap();
    let listen = format!("--web.listen-address=127.0.0.1:{port}");
    let config_arg = format!("--config.file={}", config_path.display());
    let storage = format!("--storage.path={}", dir.join("data").display());
    let process = spawn(
        &binary,
        &[&config_arg, &storage, &listen, "--cluster.listen-address="],
        &dir.join("alertmanager.log"),
    );
    must_wait(Duration::from_secs(30), "Alertmanager to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    process
}

/// A host: a service root with releases, and (once started) its agent.
pub struct TestHost {
    pub id: String,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub agent: Option<Process>,
}

/// Content of the managed config file as each release's deploy tool would write it.
pub fn config_for(version: &str) -> String {
    format!("# config of {version}\nworkers = {}\n", version.len() * 4)
}

impl TestHost {
    /// Lays out `<dir>/<id>/srv/web` with releases v1 (healthy) and v2 (unhealthy: its health
    /// file says 500), and writes the agent config. The probe is a real command that reads the
    /// health file of the `current` release.
    pub fn must_prepare(dir: &Path, id: &str, coordinator: &Coordinator) -> Self {
        let addresses = [coordinator.address.clone()];
        Self::must_prepare_for(
            dir,
            id,
            &coordinator.ca(),
            &coordinator.tls_dir(),
            &addresses,
        )
    }

    /// Like [`TestHost::must_prepare`], for an agent that knows several coordinator members.
    /// Its restart command appends a line to `<root>/restarts`, so tests can count restarts.
    pub fn must_prepare_for(
        dir: &Path,
        id: &str,
        ca: &DevCa,
        tls_dir: &Path,
        coordinators: &[String],
    ) -> Self {
        Self::must_prepare_services(dir, id, ca, tls_dir, coordinators, "test-1", &["web"])
    }

    /// A host in `region` running `services`, each laid out like `web` in
    /// [`TestHost::must_prepare`] under `<dir>/<id>/srv/<service>`; `root` is the first one's.
    /// Drain and undrain hooks append `drain`/`undrain` to `<root>/rotation`; the undrain hook
    /// then runs `<root>/on-undrain` if a test put an executable there.
    pub fn must_prepare_services(
        dir: &Path,
        id: &str,
        ca: &DevCa,
        tls_dir: &Path,
        coordinators: &[String],
        region: &str,
        services: &[&str],
    ) -> Self {
        let mut blocks = String::new();
        for service in services {
            let root = dir.join(id).join("srv").join(service);
            for (version, status) in [("v1", "200"), ("v2", "500")] {
                let release = root.join("releases").join(version);
                std::fs::create_dir_all(&release).unwrap();
                std::fs::write(release.join("VERSION"), version).unwrap();
                std::fs::write(release.join("health_status"), status).unwrap();
            }
            std::fs::create_dir_all(root.join("config")).unwrap();
            std::fs::write(root.join("config/app.toml"), config_for("v1")).unwrap();
            blocks += &format!(
                r#"[[service]]
name = "{service}"
root = "{root}"
config-files = ["config/app.toml"]
flags-file = "config/flags.json"
restart-command = ["sh", "-c", "echo restarted >> {root}/restarts"]
[service.drain]
command = ["sh", "-c", "echo drain >> {root}/rotation"]
[service.undrain]
command = ["sh", "-c", "echo undrain >> {root}/rotation; if [ -x {root}/on-undrain ]; then {root}/on-undrain; fi"]
[[service.probe]]
name = "health-file"
command = ["grep", "-q", "200", "{root}/current/health_status"]
timeout-ms = 2000
"#,
                root = root.display(),
            );
        }
        ca.write_identity(tls_dir, &Subject::new(Kind::Agent, id), &[])
            .unwrap();
        let tls = tls_dir;
        let config = format!(
            r#"host-id = "{id}"
coordinators = [{addresses}]
data-dir = "{data}"
health-interval-ms = 300
[tls]
ca = "{tls}/ca.pem"
cert = "{tls}/{id}.pem"
key = "{tls}/{id}.key"
[labels]
region = "{region}"
{blocks}"#,
            addresses = coordinators
                .iter()
                .map(|address| format!("{address:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            data = dir.join(id).join("agent").display(),
            tls = tls.display(),
        );
        let config_path = dir.join(id).join("agent.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            id: id.to_string(),
            root: dir.join(id).join("srv").join(services[0]),
            config_path,
            agent: None,
        }
    }

    /// Has the agent scrape `url` for the service's own figures (`http_requests_total` with a
    /// `code` label, `http_request_duration_seconds`), through a `[service.metrics]` section
    /// for its first (with one service, only) service.
    pub fn must_scrape_metrics(&self, url: &str) {
        let mut config = std::fs::read_to_string(&self.config_path).unwrap();
        config += &format!(
            "[service.metrics]\nurl = \"{url}\"\nrequests = \"http_requests_total\"\n\
             latency = \"http_request_duration_seconds\"\ntimeout-ms = 1000\n"
        );
        std::fs::write(&self.config_path, config).unwrap();
    }

    pub fn must_start_agent(&mut self) {
        self.must_start_agent_from(&must_binary("rewind-agent"));
    }

    /// Starts the agent from a given build of it (the footprint benchmark measures the one
    /// built with the `agent` profile, as shipped).
    pub fn must_start_agent_from(&mut self, binary: &Path) {
        self.must_start_agent_with_failpoints_from(binary, "");
    }

    /// Starts the agent with crash points armed (`REWIND_FAILPOINTS`).
    pub fn must_start_agent_with_failpoints(&mut self, failpoints: &str) {
        self.must_start_agent_with_failpoints_from(&must_binary("rewind-agent"), failpoints);
    }

    fn must_start_agent_with_failpoints_from(&mut self, binary: &Path, failpoints: &str) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let log = self.config_path.with_file_name("agent.log");
        let args = ["--config", self.config_path.to_str().unwrap(), "run"];
        self.agent = Some(spawn_with(None, binary, &args, &log, failpoints));
    }

    /// Adds a `[service.database]` section to the host's (last) service: it is a shard of
    /// that database.
    pub fn must_be_shard_of(&self, server: &Postgres) {
        let config = std::fs::read_to_string(&self.config_path).unwrap()
            + &format!("[service.database]\npostgres = \"{}\"\n", server.url());
        std::fs::write(&self.config_path, config).unwrap();
    }

    pub fn current_link(&self) -> String {
        std::fs::read_link(self.root.join("current"))
            .map(|target| target.display().to_string())
            .unwrap_or_default()
    }

    /// Panics unless the host is exactly back on v1: its `current` link and its config bytes.
    pub fn must_be_restored_to_v1(&self) {
        assert_eq!(self.current_link(), "releases/v1", "{}", self.id);
        assert_eq!(
            self.config_bytes(),
            config_for("v1").as_bytes(),
            "{}",
            self.id
        );
    }

    /// How many times the service was restarted (activations and rollback restarts).
    pub fn restarts(&self) -> usize {
        std::fs::read_to_string(self.root.join("restarts"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// Stops the agent (its store is locked while it runs) and reads its step journal, one
    /// record per step it executed (`rewind-agent journal list --json`).
    pub fn must_stop_and_read_journal(&mut self) -> Vec<serde_json::Value> {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let output = Command::new(must_binary("rewind-agent"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["journal", "list", "--json"])
            .output()
            .expect("run rewind-agent journal list");
        assert!(
            output.status.success(),
            "{}: journal list failed: {}",
            self.id,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("a journal record"))
            .collect()
    }

    /// The service's flags file as the agent wrote it (empty when it has not).
    pub fn flags(&self) -> std::collections::BTreeMap<String, bool> {
        std::fs::read(self.root.join("config/flags.json"))
            .map(|bytes| serde_json::from_slice(&bytes).expect("a JSON object of booleans"))
            .unwrap_or_default()
    }

    pub fn config_bytes(&self) -> Vec<u8> {
        std::fs::read(self.root.join("config/app.toml")).unwrap()
    }
}

/// The stdout of a `rewindctl` run that must have succeeded.
pub fn run_ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "rewindctl failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Polls `check` every 100 ms until it returns a value; panics after `limit`.
pub fn must_wait<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Async form of [`must_wait`].
pub async fn must_wait_async<T, F>(limit: Duration, what: &str, mut check: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a [`ClusterHarness`] is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `storage.snapshot-every` of every member.
    pub snapshot_every: u64,
    /// A member that listens apart from the address the others dial (a proxy the test runs in
    /// front of it). Loopback clusters only.
    pub listen_apart: Option<ListenApart>,
    /// The coordinator binary members start from (another release's); this build's if None.
    pub coordinator_binary: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ListenApart {
    pub member: u64,
    /// Where it listens.
    pub listen: String,
    /// What peers, agents and clients dial.
    pub advertised: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            // Small, so snapshots, compaction and snapshot installs happen in every test run.
            snapshot_every: 50,
            listen_apart: None,
            coordinator_binary: None,
        }
    }
}

/// A multi-member coordinator cluster of real processes on loopback, with its own CA.
pub struct ClusterHarness {
    pub dir: PathBuf,
    pub tls_dir: PathBuf,
    pub ca: DevCa,
    /// What peers, agents and clients dial, by member (id - 1).
    pub addresses: Vec<String>,
    /// Where each member listens: its address, unless the test put something in between.
    listens: Vec<String>,
    /// Each member's `/metrics` and webhooks (plain HTTP).
    pub http_addresses: Vec<String>,
    members: Vec<Option<Process>>,
    /// Members run in their own network namespaces here, when the cluster can be partitioned.
    network: Option<PrivateNet>,
    /// Members cut off from the network right now.
    cut: Vec<u64>,
    /// `storage.snapshot-every` of every member: small in tests so snapshots happen.
    snapshot_every: u64,
    /// The binary each member (id - 1) starts from.
    binaries: Vec<PathBuf>,
}

impl ClusterHarness {
    /// Starts `size` members (ids 1..=size) that bootstrap one cluster, on loopback.
    pub fn must_start(dir: &Path, size: u64) -> Self {
        Self::must_start_with(dir, size, None, ClusterOptions::default())
    }

    /// Like [`ClusterHarness::must_start`], with these options.
    pub fn must_start_with_options(dir: &Path, size: u64, options: ClusterOptions) -> Self {
        Self::must_start_with(dir, size, None, options)
    }

    /// Like [`ClusterHarness::must_start`], each member in its own network namespace on a
    /// private network, so [`ClusterHarness::cut`] can partition it. Needs root.
    pub fn must_start_partitionable(dir: &Path, size: u64) -> Self {
        let network = PrivateNet::create(size)
            .unwrap_or_else(|error| panic!("build a private network: {error}"));
        Self::must_start_with(dir, size, Some(network), ClusterOptions::default())
    }

    /// Like [`ClusterHarness::must_start`] with the production snapshot interval, for
    /// benchmarks.
    pub fn must_start_for_benchmark(dir: &Path, size: u64) -> Self {
        let options = ClusterOptions {
            snapshot_every: 10_000,
            ..ClusterOptions::default()
        };
        Self::must_start_with(dir, size, None, options)
    }

    fn must_start_with(
        dir: &Path,
        size: u64,
        network: Option<PrivateNet>,
        options: ClusterOptions,
    ) -> Self {
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = DevCa::generate("test cluster CA").unwrap();
        ca.save(&tls_dir).unwrap();
        ca.write_identity(&tls_dir, &Subject::new(Kind::User, dev_ca::OPERATOR), &[])
            .unwrap();
        // The operator administers the cluster, as `--dev` makes it.
        let policy = format!(
            "[[binding]]\nname = \"operator-admin\"\nrole = \"admin\"\nidentities = [\"user:{}\"]\nscopes = [\"*\"]\n\n\
             [[binding]]\nname = \"monitoring\"\nrole = \"operator\"\n\
             identities = [\"automation:alertmanager\", \"automation:webhook\"]\nscopes = [\"*\"]\n",
            dev_ca::OPERATOR
        );
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let addresses: Vec<String> = match &network {
            Some(network) => (1..=size)
                .map(|id| format!("{}:7443", network.address(id)))
                .collect(),
            None => {
                // Reserve distinct free ports, then release them for the members to bind.
                let listeners: Vec<std::net::TcpListener> = (0..size)
                    .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                    .collect();
                listeners
                    .iter()
                    .map(|listener| listener.local_addr().unwrap().to_string())
                    .collect()
            }
        };
        let mut listens = addresses.clone();
        let mut addresses = addresses;
        if let Some(apart) = options.listen_apart {
            addresses[apart.member as usize - 1] = apart.advertised;
            listens[apart.member as usize - 1] = apart.listen;
        }
        let http_addresses = listens
            .iter()
            .map(|listen| {
                let host = listen
                    .rsplit_once(':')
                    .map_or("127.0.0.1", |(host, _)| host);
                format!("{host}:{}", free_port())
            })
            .collect();
        let mut harness = Self {
            dir: dir.to_path_buf(),
            tls_dir,
            ca,
            addresses,
            listens,
            http_addresses,
            members: Vec::new(),
            network,
            cut: Vec::new(),
            snapshot_every: options.snapshot_every,
            binaries: Vec::new(),
        };
        let binary = options
            .coordinator_binary
            .unwrap_or_else(|| must_binary("rewind-coordinator"));
        for id in 1..=size {
            harness.must_write_identity(id);
            harness.write_config(id, false);
            harness.members.push(None);
            harness.binaries.push(binary.clone());
            harness.must_start_member(id);
        }
        harness
    }

    /// Member `id`'s certificate: its CN, and the host of its address as a SAN.
    fn must_write_identity(&self, id: u64) {
        let host = self.addresses[id as usize - 1]
            .rsplit_once(':')
            .map(|(host, _)| host.to_string())
            .unwrap();
        self.ca
            .write_identity(
                &self.tls_dir,
                &Subject::member(id, &format!("coordinator-{id}")),
                &["localhost", "127.0.0.1", &host],
            )
            .unwrap();
    }

    /// Prepares a host for each of `ids` whose agent dials this cluster's members (not started).
    pub fn must_prepare_hosts(&self, dir: &Path, ids: &[&str]) -> Vec<TestHost> {
        ids.iter()
            .map(|id| TestHost::must_prepare_for(dir, id, &self.ca, &self.tls_dir, &self.addresses))
            .collect()
    }

    /// Cuts member `id` off from every peer, agent and client (needs a partitionable cluster).
    pub fn cut(&mut self, id: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.cut(id).unwrap();
        self.cut.push(id);
    }

    /// Reconnects member `id`.
    pub fn heal(&mut self, id: u64) {
        let network = self.network.as_ref().expect("a partitionable cluster");
        network.heal(id).unwrap();
        self.cut.retain(|&cut| cut != id);
    }

    /// Members cut off right now.
    pub fn cut_members(&self) -> &[u64] {
        &self.cut
    }

    fn config_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("member-{id}.toml"))
    }

    /// Starts one more member (the next id) that joins the running cluster: its config sets
    /// `cluster.join` and lists every member so far. Returns its id; the cluster still has to add
    /// it (`rewindctl cluster add`).
    pub fn must_start_joining(&mut self) -> u64 {
        self.must_start_joining_from(&must_binary("rewind-coordinator"))
    }

    /// Like [`ClusterHarness::must_start_joining`], from `binary` (another release's).
    pub fn must_start_joining_from(&mut self, binary: &Path) -> u64 {
        assert!(
            self.network.is_none(),
            "a joining member runs on loopback only"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        self.addresses.push(address.clone());
        self.listens.push(address);
        self.http_addresses
            .push(format!("127.0.0.1:{}", free_port()));
        let id = self.addresses.len() as u64;
        self.must_write_identity(id);
        self.write_config(id, true);
        self.members.push(None);
        self.binaries.push(binary.to_path_buf());
        self.must_start_member(id);
        id
    }

    /// Runs `rewindctl` as the operator against member `id`, and returns what it printed.
    pub fn rewindctl(&self, id: u64, args: &[&str]) -> std::process::Output {
        std::process::Command::new(must_binary("rewindctl"))
            .args(["--coordinator", &self.addresses[id as usize - 1]])
            .args(args)
            .env("REWIND_TLS_DIR", &self.tls_dir)
            .env("REWIND_SERVER_NAME", "localhost")
            .output()
            .expect("run rewindctl")
    }

    fn write_config(&self, id: u64, join: bool) {
        let members: String = self
            .addresses
            .iter()
            .enumerate()
            .map(|(index, address)| format!("[[cluster.member]]\nid = {}\naddress = \"{address}\"\nregion = \"region-{}\"\n", index + 1, index + 1))
            .collect();
        let tls = self.tls_dir.display();
        let config = format!(
            r#"listen = "{listen}"
data-dir = "{data}"
[tls]
ca = "{tls}/ca.pem"
cert = "{tls}/coordinator-{id}.pem"
key = "{tls}/coordinator-{id}.key"
[engine]
step-timeout-s = 5
verify-timeout-s = 20
tick-ms = 100
[health]
report-interval-ms = 300
window-s = 3
[storage]
snapshot-every = {snapshot_every}
[http]
listen = "{http}"
[access]
bootstrap-policy-file = "{policy}"
[cluster]
id = "test-cluster"
member-id = {id}
tick-ms = 50
join = {join}
{members}"#,
            listen = self.listens[id as usize - 1],
            http = self.http_addresses[id as usize - 1],
            snapshot_every = self.snapshot_every,
            data = self.dir.join(format!("member-{id}")).display(),
            policy = self.dir.join("policy.toml").display(),
        );
        std::fs::write(self.config_path(id), config).unwrap();
    }

    pub fn must_start_member(&mut self, id: u64) {
        let config = self.config_path(id);
        let log = self.dir.join(format!("member-{id}.log"));
        let namespace = self.network.as_ref().map(|network| network.namespace(id));
        let process = spawn_in(
            namespace.as_deref(),
            &self.binaries[id as usize - 1],
            &["--config", config.to_str().unwrap()],
            &log,
        );
        self.members[id as usize - 1] = Some(process);
    }

    /// Starts member `id` from `binary` (another release's), as it will be started from now on:
    /// an upgrade in place when it ran another binary on the same data directory.
    pub fn must_start_member_from(&mut self, id: u64, binary: &Path) {
        self.binaries[id as usize - 1] = binary.to_path_buf();
        self.must_start_member(id);
    }

    /// If member `id` exited on its own: its status (and it counts as stopped from now on).
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let slot = &mut self.members[id as usize - 1];
        let status = slot.as_mut()?.child.try_wait().ok().flatten()?;
        *slot = None;
        Some(status)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.members[id as usize - 1].take() {
            process.kill();
        }
    }

    pub async fn client_for(&self, address: &str) -> Result<ControlServiceClient<Channel>, String> {
        Ok(ControlServiceClient::new(self.channel_for(address).await?))
    }

    /// A channel to one member, authenticated as the operator.
    pub async fn channel_for(&self, address: &str) -> Result<Channel, String> {
        operator_channel(&self.tls_dir, address).await
    }

    /// A channel to one member with member 1's certificate: only members call
    /// `MemberService` and `RaftService`.
    pub async fn member_channel_for(&self, address: &str) -> Result<Channel, String> {
        tls_channel(&TlsFiles::in_dir(&self.tls_dir, "coordinator-1"), address).await
    }

    /// Ids of the members currently running.
    pub fn live_members(&self) -> Vec<u64> {
        (1..=self.members.len() as u64)
            .filter(|&id| self.members[id as usize - 1].is_some())
            .collect()
    }

    /// Member `id`'s latest state snapshot on disk: the index it covers and its size in bytes.
    pub fn latest_snapshot(&self, id: u64) -> Option<(u64, u64)> {
        let dir = self
            .dir
            .join(format!("member-{id}"))
            .join("raft")
            .join("state-snapshots");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|file| {
                let name = file.file_name().into_string().ok()?;
                let index = name.strip_suffix(".state")?.parse().ok()?;
                Some((index, file.metadata().ok()?.len()))
            })
            .max()
    }

    /// What member `id` holds (`MemberService`; `brief` leaves out the state digest and the
    /// audit check), or why it did not say.
    pub async fn member_status(
        &self,
        id: u64,
        brief: bool,
    ) -> Result<rewind_proto::v1::MemberStatus, String> {
        use rewind_proto::v1::member_service_client::MemberServiceClient;
        let channel = self
            .member_channel_for(&self.addresses[id as usize - 1])
            .await?;
        MemberServiceClient::new(channel)
            .get_member_status(rewind_proto::v1::GetMemberStatusRequest { brief })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.to_string())
    }

    /// Waits up to `limit` until member `id` has applied at least what member `leader` had
    /// applied when asked; with `same_state`, until both are at one index with one state
    /// digest. Returns the index reached, or says how far it got.
    pub async fn catch_up(
        &self,
        id: u64,
        leader: u64,
        limit: Duration,
        same_state: bool,
    ) -> Result<u64, String> {
        let started = Instant::now();
        let target = self
            .member_status(leader, true)
            .await
            .map_err(|error| format!("ask the leader, member {leader}: {error}"))?
            .applied_index;
        let mut reached = 0;
        while started.elapsed() < limit {
            if let Ok(behind) = self.member_status(id, !same_state).await {
                reached = behind.applied_index;
                let agrees = || async {
                    let ahead = self.member_status(leader, false).await.ok()?;
                    (ahead.applied_index == behind.applied_index
                        && ahead.state_digest == behind.state_digest)
                        .then_some(())
                };
                if reached >= target && (!same_state || agrees().await.is_some()) {
                    return Ok(reached);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "member {id} reached index {reached} within {} s, not the leader's {target}{}",
            limit.as_secs(),
            if same_state {
                " with the leader's state"
            } else {
                ""
            }
        ))
    }

    /// [`ClusterHarness::catch_up`] to the leader's index and state, or panics.
    pub async fn must_catch_up(&self, id: u64, leader: u64, limit: Duration) -> u64 {
        self.catch_up(id, leader, limit, true)
            .await
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// The live member that serves (the caught-up leader), and a client to it.
    pub async fn must_leader(&self) -> (u64, ControlServiceClient<Channel>) {
        must_wait_async(Duration::from_secs(30), "a leader", || async {
            for (index, member) in self.members.iter().enumerate() {
                if member.is_none() || self.cut.contains(&(index as u64 + 1)) {
                    continue;
                }
                let Ok(mut client) = self.client_for(&self.addresses[index]).await else {
                    continue;
                };
                let request = rewind_proto::v1::ListServicesRequest {};
                if client.list_services(request).await.is_ok() {
                    return Some((index as u64 + 1, client));
                }
            }
            None
        })
        .await
    }
}

/// Grows the replicated state until the leader's latest snapshot file is larger than `bytes`:
/// registers releases of a service `big` whose `requires` name 256 providers each, 120
/// random-looking characters a name (about 30 KiB a write, which compresses little), four
/// writers at once, through whichever member leads. Returns the number of writes.
pub async fn must_grow_state_past(cluster: &ClusterHarness, bytes: u64) -> u64 {
    use rewind_proto::v1 as pb;
    let service = plain_service("big");
    let started = Instant::now();
    let mut writes: u64 = 0;
    loop {
        let (leader, client) = cluster.must_leader().await;
        if cluster
            .latest_snapshot(leader)
            .is_some_and(|(_, size)| size > bytes)
        {
            return writes;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the leader's snapshot stayed under {bytes} bytes after {writes} writes"
        );
        let mut batch = tokio::task::JoinSet::new();
        // Numbered across calls, so a later call adds releases rather than repeating them.
        let first_of_batch = NEXT_LARGE_RELEASE.fetch_add(100, std::sync::atomic::Ordering::SeqCst);
        for writer in 0..4 {
            let mut client = client.clone();
            let first = first_of_batch + writer * 25;
            let service = service.clone();
            batch.spawn(async move {
                let put = pb::PutServiceRequest {
                    request_id: "big".into(),
                    service: Some(service),
                };
                client.put_service(put).await?;
                for number in first..first + 25 {
                    let release = pb::Release {
                        service: "big".into(),
                        version: format!("big-{number}"),
                        artifact_digest: format!(
                            "sha256:{}",
                            rewind_shared::digest::sha256_hex(&number.to_be_bytes())
                        ),
                        commit: "c0ffee".into(),
                        requires: (0..256)
                            .map(|provider| (random_name(number, provider), 1))
                            .collect(),
                        ..Default::default()
                    };
                    client
                        .register_release(pb::RegisterReleaseRequest {
                            request_id: format!("big-{number}"),
                            release: Some(release),
                        })
                        .await?;
                }
                Ok::<(), tonic::Status>(())
            });
        }
        while let Some(done) = batch.join_next().await {
            match done.expect("a writer") {
                Ok(()) => {}
                // Leadership moved: the next round writes through the new leader.
                Err(status) if status.code() == tonic::Code::Unavailable => {}
                Err(status) => panic!("register a large release: {status}"),
            }
        }
        writes += 100;
    }
}

/// Starts a change of `web` to `version` on `host_ids` (empty: every host of web) and waits
/// until it is deployed.
pub async fn must_deploy_web(
    admin: &ControlServiceClient<Channel>,
    version: &str,
    host_ids: &[&str],
) -> String {
    let request = rewind_proto::v1::StartChangeRequest {
        service: "web".into(),
        version: version.into(),
        host_ids: host_ids.iter().map(|id| id.to_string()).collect(),
        reason: "test".into(),
        ..Default::default()
    };
    let change_id = admin
        .clone()
        .start_change(request)
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id;
    must_change_where(admin, &change_id, "the change deployed", |change| {
        change.state == rewind_proto::v1::ChangeState::Deployed as i32
    })
    .await;
    change_id
}

/// A service with no hosts' hooks and no automatic rollback: enough to register releases of it.
pub fn plain_service(name: &str) -> rewind_proto::v1::Service {
    rewind_proto::v1::Service {
        name: name.into(),
        policy: Some(rewind_proto::v1::HealthPolicy {
            max_probe_failure_ratio: 0.5,
            for_s: 1,
            watch_s: 60,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The audit log's first 1000 entries.
pub async fn must_list_audit(
    client: &ControlServiceClient<Channel>,
) -> Vec<rewind_proto::v1::AuditEntry> {
    client
        .clone()
        .list_audit(rewind_proto::v1::ListAuditRequest {
            from_index: 0,
            limit: 1000,
        })
        .await
        .expect("list the audit log")
        .into_inner()
        .entries
}

static NEXT_LARGE_RELEASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// 120 characters of `[a-z0-9]` that depend on both numbers and repeat nothing: a provider
/// name that compresses about as little as a name can.
fn random_name(release: u64, provider: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0u64..4)
        .flat_map(|part| {
            let seed = [release, provider, part].map(u64::to_be_bytes).concat();
            hex::decode(rewind_shared::digest::sha256_hex(&seed)).unwrap_or_default()
        })
        .take(120)
        .map(|byte| ALPHABET[usize::from(byte) % ALPHABET.len()] as char)
        .collect()
}

/// A channel to a coordinator member at `address`, authenticated as the operator whose
/// certificate is in `tls_dir`; the member's certificate must name `localhost`.
pub async fn operator_channel(tls_dir: &Path, address: &str) -> Result<Channel, String> {
    tls_channel(&TlsFiles::in_dir(tls_dir, dev_ca::OPERATOR), address).await
}

/// A channel to a coordinator member at `address` with these certificate files.
pub async fn tls_channel(files: &TlsFiles, address: &str) -> Result<Channel, String> {
    let tls = files
        .client_config("localhost")
        .map_err(|error| error.to_string())?;
    Endpoint::from_shared(format!("https://{address}"))
        .map_err(|error| error.to_string())?
        .tls_config(tls)
        .map_err(|error| error.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| format!("{error:?}"))
}

/// A channel to a coordinator member presenting no certificate (as a host that has not joined
/// yet), trusting the CA in `ca` and only a member's certificate.
pub async fn anonymous_channel(ca: &Path, address: &str) -> Result<Channel, String> {
    let connector = rewind_shared::member_tls::MemberConnector::anonymous(ca)
        .map_err(|error| error.to_string())?;
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|error| error.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|error| format!("{error:?}"))
}

/// Prepares a host for each of `ids` (see [`TestHost::must_prepare`]), starts their agents and
/// waits until all are connected; returns them with a client of the coordinator.
pub async fn must_start_hosts(
    dir: &Path,
    coordinator: &Coordinator,
    ids: &[&str],
) -> (Vec<TestHost>, ControlServiceClient<Channel>) {
    let mut hosts: Vec<TestHost> = ids
        .iter()
        .map(|id| TestHost::must_prepare(dir, id, coordinator))
        .collect();
    for host in &mut hosts {
        host.must_start_agent();
    }
    let client = coordinator.must_client().await;
    must_agents_connected(&client, ids.len()).await;
    (hosts, client)
}

/// Waits until `count` agents are connected to the member behind `client`.
pub async fn must_agents_connected(client: &ControlServiceClient<Channel>, count: usize) {
    must_wait_async(Duration::from_secs(60), "agents to connect", || {
        let mut client = client.clone();
        async move {
            let hosts = client
                .list_hosts(rewind_proto::v1::ListHostsRequest::default())
                .await
                .ok()?
                .into_inner()
                .hosts;
            (hosts.iter().filter(|host| host.connected).count() == count).then_some(())
        }
    })
    .await;
}

/// Registers service `web` (rolled back automatically when more than half its probes fail for
/// 1 s, if `auto_rollback`) and its releases v1 and v2, digested from `host`'s release dirs.
pub async fn must_register_web(
    client: &mut ControlServiceClient<Channel>,
    host: &TestHost,
    auto_rollback: bool,
) {
    use rewind_proto::v1 as pb;
    let policy = pb::HealthPolicy {
        max_probe_failure_ratio: 0.5,
        for_s: 1,
        watch_s: 120,
        auto_rollback,
        conditions: vec![],
    };
    let service = pb::Service {
        name: "web".into(),
        depends_on: vec![],
        policy: Some(policy),
        synthetics: vec![],
        rollback_steps: vec![],
    };
    client
        .put_service(pb::PutServiceRequest {
            request_id: "svc".into(),
            service: Some(service),
        })
        .await
        .expect("put service");
    for version in ["v1", "v2"] {
        let artifact_digest =
            rewind_shared::digest::tree_digest(&host.root.join("releases").join(version))
                .expect("digest");
        let release = pb::Release {
            service: "web".into(),
            version: version.into(),
            artifact_digest,
            commit: "c0ffee".into(),
            registered_at_ms: 0,
            ..Default::default()
        };
        let request = pb::RegisterReleaseRequest {
            request_id: format!("release-{version}"),
            release: Some(release),
        };
        client
            .register_release(request)
            .await
            .expect("register release");
    }
}

/// Starts a change of `web` to `version` (request id `change-<version>`) and returns its id.
pub async fn must_change(client: &mut ControlServiceClient<Channel>, version: &str) -> String {
    let request = rewind_proto::v1::StartChangeRequest {
        request_id: format!("change-{version}"),
        service: "web".into(),
        version: version.into(),
        host_ids: vec![],
        reason: "test".into(),
        flags_on: vec![],
        migrations: vec![],
        break_glass: false,
    };
    client
        .start_change(request)
        .await
        .unwrap()
        .into_inner()
        .change
        .unwrap()
        .change_id
}

/// Waits until the change satisfies `done`: up to 180 s, as a loaded CI machine runs four
/// integration tests at once on two cores (60 s was once too short for an automatic rollback).
pub async fn must_change_where(
    client: &ControlServiceClient<Channel>,
    change_id: &str,
    what: &str,
    done: impl Fn(&rewind_proto::v1::Change) -> bool,
) -> rewind_proto::v1::Change {
    must_wait_async(Duration::from_secs(180), what, || {
        let mut client = client.clone();
        let change_id = change_id.to_string();
        let done = &done;
        async move {
            let change = client
                .get_change(rewind_proto::v1::GetChangeRequest { change_id })
                .await
                .ok()?
                .into_inner()
                .change?;
            done(&change).then_some(change)
        }
    })
    .await
}

/// Waits until the rollback has ended and returns it.
pub async fn must_rollback_end(
    client: &ControlServiceClient<Channel>,
    rollback_id: &str,
) -> rewind_proto::v1::Rollback {
    // Generous: rollbacks now pass a health gate per wave, and CI is loaded.
    must_wait_async(Duration::from_secs(180), "the rollback to end", || {
        let mut client = client.clone();
        let rollback_id = rollback_id.to_string();
        async move {
            let rollback = client
                .get_rollback(rewind_proto::v1::GetRollbackRequest { rollback_id })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            rewind_proto::v1::RollbackState::try_from(rollback.state)
                .ok()?
                .is_terminal()
                .then_some(rollback)
        }
    })
    .await
}

/// Registers `web`, deploys v1 then v2 (ch-1, ch-2) on every host, and has the "deploy tool"
/// write v2's config on each host: the state a rollback of ch-2 must undo.
pub async fn must_deploy_v1_then_v2(
    client: &mut ControlServiceClient<Channel>,
    hosts: &[TestHost],
) {
    must_register_web(client, &hosts[0], false).await;
    for version in ["v1", "v2"] {
        let change_id = must_change(client, version).await;
        must_change_where(client, &change_id, "the change to deploy", |change| {
            change.state == rewind_proto::v1::ChangeState::Deployed as i32
        })
        .await;
    }
    for host in hosts {
        std::fs::write(host.root.join("config/app.toml"), config_for("v2")).unwrap();
    }
}

/// Starts a rollback of ch-2 one host at a time and waits until a step has been attempted:
/// the moment to inject a fault. Returns the rollback id.
pub async fn must_start_rollback_of_v2(client: &mut ControlServiceClient<Channel>) -> String {
    use rewind_proto::v1 as pb;
    let start = pb::StartRollbackRequest {
        request_id: "rb".into(),
        change_id: "ch-2".into(),
        reason: "bad release".into(),
        max_parallel: 1,
        ..Default::default()
    };
    let rollback_id = client
        .start_rollback(start)
        .await
        .unwrap()
        .into_inner()
        .rollback
        .unwrap()
        .rollback_id;
    must_wait_async(Duration::from_secs(90), "the rollback to begin", || {
        let mut client = client.clone();
        let rollback_id = rollback_id.clone();
        async move {
            let rollback = client
                .get_rollback(pb::GetRollbackRequest { rollback_id })
                .await
                .ok()?
                .into_inner()
                .rollback?;
            rollback
                .steps
                .iter()
                .any(|step| step.attempts > 0)
                .then_some(())
        }
    })
    .await;
    rollback_id
}

/// After a failover: the rollback of v2 ended succeeded, every host is back on v1 having
/// restarted exactly three times (two activations, one rollback: nothing twice), and the audit
/// chain verifies.
pub async fn must_have_rolled_back_v2_once(
    client: &mut ControlServiceClient<Channel>,
    rollback_id: &str,
    hosts: &[TestHost],
) {
    use rewind_proto::v1 as pb;
    let rollback = must_rollback_end(client, rollback_id).await;
    assert_eq!(
        rollback.state,
        pb::RollbackState::Succeeded as i32,
        "{rollback:?}"
    );
    for host in hosts {
        host.must_be_restored_to_v1();
        assert_eq!(
            host.restarts(),
            3,
            "{}: two activations and one rollback restart, none twice",
            host.id
        );
    }
    let audit = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(audit.ok, "{audit:?}");
}
