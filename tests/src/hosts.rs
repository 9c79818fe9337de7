//! Hosts with a real agent each: service roots, releases, configs, journals.

use crate::*;

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

    /// Starts the agent inside a network namespace (a partitionable cluster's spare one).
    pub fn must_start_agent_in(&mut self, namespace: &str) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let log = self.config_path.with_file_name("agent.log");
        let args = ["--config", self.config_path.to_str().unwrap(), "run"];
        let binary = must_binary("rewind-agent");
        self.agent = Some(spawn_with(Some(namespace), &binary, &args, &log, ""));
    }

    /// Starts the agent with these environment variables besides the usual ones.
    pub fn must_start_agent_with_environment(&mut self, variables: &[(&str, &str)]) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let log = self.config_path.with_file_name("agent.log");
        let args = ["--config", self.config_path.to_str().unwrap(), "run"];
        let binary = must_binary("rewind-agent");
        self.agent = Some(spawn_launched(
            Launch::WithEnvironment(variables),
            &binary,
            &args,
            &log,
            "",
        ));
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
