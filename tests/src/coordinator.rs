//! A single coordinator process with its dev CA, and channels to it.

use crate::*;

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
        // A port a restart can have back (see `free_port`).
        Self::must_start_listening(dir, config, &free_address())
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

    /// A dev coordinator started with these environment variables besides the usual ones.
    pub fn must_start_with_environment(
        dir: &Path,
        config: &str,
        variables: &[(&str, &str)],
    ) -> Self {
        Self::must_start_launched(
            dir,
            config,
            "127.0.0.1:0",
            "",
            Launch::WithEnvironment(variables),
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
            // Never the contexts of whoever runs the tests.
            .env("REWIND_CONTEXTS_FILE", "/nonexistent/rewind-contexts.toml")
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
